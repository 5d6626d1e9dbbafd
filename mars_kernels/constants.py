"""Numbers the reference (`mars.reference`) and every kernel (Triton here, C++/CUDA in csrc/)
share, defined once below both packages. Pure Python: importing it needs no Triton.

k3 = e^d - 1 - d (docs/loss.md, "KL estimators"): for |d| < K3_SERIES_BELOW it is computed as
its Taylor series sum_{n=2..15} d^n / n! by Horner's rule (K3_COEFS: 1/n!, highest n first),
which keeps the relative error at float precision where e^d - 1 - d cancels.
"""
import math

K3_SERIES_BELOW = 0.5
K3_COEFS = tuple(1.0 / math.factorial(n) for n in range(15, 1, -1))
