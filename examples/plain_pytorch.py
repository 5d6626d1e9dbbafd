"""mars.loss in a plain PyTorch loop: a tiny policy learns to emit token 3 (reward 1)."""
import torch
import mars

torch.manual_seed(0)
V, B, T = 8, 16, 12                                    # vocab, rollouts, response tokens
policy = torch.nn.Sequential(torch.nn.Embedding(V, 32), torch.nn.Linear(32, V))
opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
crit = mars.loss.MarsLoss(clip_low=0.2, clip_high=0.28, agg="token-mean")
for step in range(30):
    with torch.no_grad():                              # rollout: sample T tokens per row
        ids = torch.zeros(B, T + 1, dtype=torch.long)
        for t in range(T):
            ids[:, t + 1] = torch.multinomial(policy(ids[:, t]).softmax(-1), 1)[:, 0]
    tokens, mask = ids[:, 1:], torch.ones(B, T, dtype=torch.bool)
    reward = (tokens == 3).float().mean(1)             # verifiable reward per rollout
    adv = mars.mono_anchored_advantage(reward, torch.arange(B) // 4)  # GRPO groups of 4
    logp_of = lambda: policy(ids[:, :-1]).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    old_logp = logp_of().detach()
    for _ in range(2):                                 # two PPO epochs on the same rollouts
        out = crit(logp_of(), old_logp, adv, mask)
        opt.zero_grad(); out.loss.backward(); opt.step()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d} reward {reward.mean():.2f} clip {out.metrics['clip_frac_high']:.3f}")
