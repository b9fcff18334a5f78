"""Non-finite and degenerate operator inputs: ONE behaviour on every backend.

Rule (drople_fast.ops.functional.nonfinite_samples): a sample with a NaN or inf in q, k or
hidden at a valid token (or any in the bridge) is left untouched -- importance 0, drop
probability 0, nothing dropped, every valid token kept -- whatever the backend; every other
sample gets exactly the mask the reference gives. Degenerate sizes are named ValueErrors.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drople_fast as df
from drople_fast.ops.backends import BACKENDS
from drople_fast.ops.primitives import keep_order
from drople_fast.ops.testing import Case, make_inputs

BACKEND_NAMES = [name for name in BACKENDS if BACKENDS[name].why_not(torch.device("cpu"), torch.float32) is None]
POISON = (float("nan"), float("inf"), float("-inf"))


@st.composite
def poisoned(draw):
    B = draw(st.integers(1, 3))
    S = draw(st.integers(2, 9))
    case = Case(B, draw(st.integers(1, 2)), S, Dh=4, D=6, M=3, P=4, causal=draw(st.booleans()),
                padded=draw(st.booleans()), anchor=draw(st.sampled_from(["first", "eos"])))
    inputs = make_inputs(case, generator_seed=draw(st.integers(0, 1000)))
    valid = inputs["valid"] if inputs["valid"] is not None else torch.ones(B, S, dtype=torch.bool)
    bad = torch.zeros(B, dtype=torch.bool)
    for b in range(B):
        if draw(st.booleans()):
            j = draw(st.sampled_from(valid[b].nonzero().flatten().tolist()))
            name = draw(st.sampled_from(["q", "k", "hidden"]))
            value = draw(st.sampled_from(POISON))
            if name == "hidden":
                inputs[name][b, j, draw(st.integers(0, case.D - 1))] = value
            else:
                inputs[name][b, draw(st.integers(0, case.H - 1)), j, draw(st.integers(0, case.Dh - 1))] = value
            bad[b] = True
    inputs["seed"] = draw(st.integers(-(2**63), 2**63 - 1))
    return inputs, valid, bad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter computes on the NaNs
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(poisoned())
def test_non_finite_inputs_have_one_behaviour_on_every_backend(data):
    inputs, valid, bad = data
    reference = df.iwtd(**inputs, backend="reference")
    for name in BACKEND_NAMES:
        out = df.iwtd(**inputs, backend=name)
        rows = bad[:, None]
        # poisoned samples: untouched
        assert not out.drop_mask[bad].any(), name
        assert (out.drop_prob[bad] == 0).all() and (out.importance[bad] == 0).all(), name
        order, count = keep_order(valid)
        assert torch.equal(out.keep_count[bad], count[bad]), name
        assert torch.equal(out.keep_order[bad], order[bad]), name
        # clean samples: the reference's decisions, exactly
        assert torch.equal(out.drop_mask & ~rows, reference.drop_mask & ~rows), name
        assert torch.isfinite(out.drop_prob).all() and torch.isfinite(out.importance).all(), name


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_non_finite_bridge_poisons_every_sample(backend):
    inputs = make_inputs(Case(2, 2, 7))
    inputs["bridge_bias"][0] = float("nan")
    out = df.iwtd(**inputs, backend=backend)
    assert not out.drop_mask.any() and (out.drop_prob == 0).all() and (out.keep_count == 7).all()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("change,fragment", [
    (dict(H=0), "H (heads) = 0"), (dict(Dh=0), "Dh (head width) = 0"), (dict(D=0), "D = 0"),
    (dict(M=0), "M (bridge tokens) = 0"), (dict(P=0), "P (bridge width) = 0"),
])
def test_degenerate_sizes_are_named_errors(backend, change, fragment):
    inputs = make_inputs(Case(2, 2, 5).with_(**change))
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        df.iwtd(**inputs, backend=backend)


@pytest.mark.parametrize("keep,num_always", [(-1, 1), (2, -1), (True, 1), (1.5, 1)])
def test_compact_fixed_refuses_negative_or_non_int_budgets(keep, num_always):
    inputs = make_inputs(Case(2, 2, 6))
    out = df.iwtd(**inputs, backend="reference")
    with pytest.raises(ValueError, match="keep|num_always"):
        df.compact_fixed(inputs["hidden"], out, keep=keep, num_always=num_always)
