"""mars for verl (tested with verl 0.9.1; ``pip install 'mars[verl]'``; docs/verl.md).

- ``plugin``: loaded by ``import verl`` through the ``verl.plugins`` entry point; registers
  the advantage estimator ``mars`` (``estimator.compute_mars_advantage``) and the policy
  loss ``mars`` (``loss.compute_policy_loss_mars``).
- ``batch``: the mono-anchor data steps on ``verl.DataProto`` (mono prompts with swapped
  images, the combined sampled + greedy generation batch, slicing it back, anchors by uid).
- ``trainer`` / ``main``: the recipe ``python -m mars.integrations.verl.main`` (legacy
  ``RayPPOTrainer`` subclass that generates the anchors).

Importing this package does not import verl; its modules do.
"""
