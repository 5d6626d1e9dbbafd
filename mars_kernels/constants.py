"""Numbers the reference (`mars.reference`) and every kernel (Triton here, C++/CUDA in csrc/)
share, defined once below both packages. Pure Python: importing it needs no Triton.

k3 = e^d - 1 - d (docs/loss.md, "KL estimators"): for |d| < K3_SERIES_BELOW it is computed as
its Taylor series sum_{n=2..15} d^n / n! by Horner's rule (K3_COEFS: 1/n!, highest n first),
which keeps the relative error at float precision where e^d - 1 - d cancels.
"""
import math

K3_SERIES_BELOW = 0.5
K3_COEFS = tuple(1.0 / math.factorial(n) for n in range(15, 1, -1))

# The policy loss's option defaults (docs/loss.md): the ratio clipped to [1 - CLIP_LOW,
# 1 + CLIP_HIGH], the log-ratio clamped to +-LOG_RATIO_CLAMP before exp, and k3's clamp
# (verl's low_var_kl): the estimate to [-KL_CLAMP, KL_CLAMP] with d to +-K3_D_CLAMP.
CLIP_LOW = 0.2
CLIP_HIGH = 0.2
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0
K3_D_CLAMP = 20.0

# The loss aggregations (docs/loss.md, mars.reference.aggregate_loss); a kernel's agg code is
# the index here.
LOSS_AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
