"""The numbers C++ cannot import: csrc/ spells out the constants of mars_kernels/constants.py
(the k3 series threshold and coefficients, the aggregation codes, the kl_clamp default of the
op schema); this reads them back from the sources and checks each equals the Python value."""

import os
import re

from mars_kernels import constants as C

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _read(name: str) -> str:
    with open(os.path.join(CSRC, name), encoding="utf-8") as f:
        return f.read()


def test_k3_series_threshold_and_coefficients_match():
    h = _read("policy_loss.h")
    assert float(re.search(r"kK3SeriesBelow = ([0-9.eE+-]+);", h).group(1)) == C.K3_SERIES_BELOW
    body = h[h.index("MARS_HD void k3_expm1"):]
    first = float(re.search(r"T p = T\(([0-9.eE+-]+)\);", body).group(1))
    rest = [float(v) for v in re.findall(r"p = p \* d \+ T\(([0-9.eE+-]+)\);", body)]
    assert [first, *rest] == list(C.K3_COEFS)  # 1/15! ... 1/2!, highest first (the reference's order)


def test_aggregation_codes_match():
    h = _read("policy_loss.h")
    enum = re.search(r"enum Agg \{([^}]*)\}", h).group(1)
    codes = {name: int(v) for name, v in re.findall(r"(k\w+) = (\d+)", enum)}
    camel = {a: "k" + "".join(w.capitalize() for w in a.split("-")) for a in C.LOSS_AGGS}
    assert {camel[a]: i for i, a in enumerate(C.LOSS_AGGS)} == codes


def test_op_schema_kl_clamp_default_matches():
    schema = _read("ops.cpp")
    assert float(re.search(r"float kl_clamp=([0-9.]+)", schema).group(1)) == C.KL_CLAMP
