"""The Optimizer base class behaves like torch.optim.Optimizer.

Expected values follow torch's documented behaviour (torch itself is not a dependency): group
construction and defaults merging, the duplicate checks and their messages, zero_grad, closures,
and the index-based state_dict format with its load-time checks.
"""

import json

import pytest

import afnio
from afnio.cognitive.parameter import Parameter
from afnio.optim import Optimizer, required
from afnio.testing import ScriptedModel


class Append(Optimizer):
    """A minimal optimizer: appends the group's suffix to every parameter that has feedback."""

    def __init__(self, params, suffix="!", **extra):
        super().__init__(params, dict(suffix=suffix, **extra))

    def step(self, closure=None):
        loss = self._evaluate_closure(closure)
        with afnio.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad:
                        p.copy_(p.data + group["suffix"])
                        self.state[p]["steps"] = self.state[p].get("steps", 0) + 1
        return loss


def params(n, prefix="p"):
    return [Parameter(f"{prefix}{i}", role=f"{prefix} role {i}") for i in range(n)]


def test_the_base_class_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Optimizer(params(1), {})


def test_a_flat_list_becomes_one_group_with_the_defaults():
    a, b = params(2)
    opt = Append([a, b], suffix="?", momentum=3)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0] == {"params": [a, b], "suffix": "?", "momentum": 3}
    assert opt.defaults == {"suffix": "?", "momentum": 3}


def test_group_options_override_defaults_and_missing_ones_are_filled():
    a, b, c = params(3)
    opt = Append([{"params": [a, b]}, {"params": c, "suffix": "#"}], suffix="!")
    assert opt.param_groups[0] == {"params": [a, b], "suffix": "!"}
    assert opt.param_groups[1] == {"params": [c], "suffix": "#"}
    assert opt.defaults == {"suffix": "!"}


def test_generators_are_accepted_like_module_parameters():
    ps = params(3)
    opt = Append(p for p in ps)
    assert opt.param_groups[0]["params"] == ps


def test_a_required_default_must_be_set_by_every_group():
    a, b = params(2)
    with pytest.raises(
        ValueError,
        match="parameter group didn't specify a value of required optimization parameter suffix",
    ):
        Append([a], suffix=required)
    opt = Append([{"params": [a], "suffix": "+"}], suffix=required)
    assert opt.param_groups[0]["suffix"] == "+"
    with pytest.raises(ValueError, match="required optimization parameter suffix"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    assert repr(required) == "<required parameter>"


def test_bad_params_arguments_raise_as_in_torch():
    a = params(1)[0]
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        Append([])
    with pytest.raises(TypeError, match="should be an iterable of Variables or dicts"):
        Append(a)
    with pytest.raises(TypeError, match="ordered collections"):
        Append([{"params": {a}}])
    with pytest.raises(TypeError, match="ordered collections"):
        Append({a})  # torch accepts a top-level set; its order is arbitrary, so afnio refuses
    with pytest.raises(TypeError, match="optimizer can only optimize Variables, but one of the"):
        Append([a, "not a variable"])
    with pytest.raises(TypeError, match="param_group must be a dict"):
        Append([a]).add_param_group([a])


def test_non_leaf_variables_cannot_be_optimized():
    a = params(1)[0]
    derived = a + " more"
    with pytest.raises(ValueError, match="can't optimize a non-leaf Variable"):
        Append([derived])


def test_a_parameter_in_two_groups_is_rejected_and_nothing_is_added():
    a, b, c = params(3)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        Append([{"params": [a, b]}, {"params": [b, c]}])
    opt = Append([a, b])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [c, a]})
    assert len(opt.param_groups) == 1


def test_a_duplicate_inside_one_group_only_warns():
    a = params(1)[0]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        Append([a, a])


def test_add_param_group_later_fills_defaults():
    a, b = params(2)
    opt = Append([a], suffix="!")
    opt.add_param_group({"params": b})
    assert opt.param_groups[1] == {"params": [b], "suffix": "!"}


def test_zero_grad_set_to_none_gives_new_lists_and_false_clears_in_place():
    a, b = params(2)
    for p in (a, b):
        p.append_grad(afnio.Variable("feedback"))
    lists = [a.grad, b.grad]
    opt = Append([a, b])
    # torch's default set_to_none=True drops the gradient; a reference taken before keeps it.
    opt.zero_grad()
    assert a.grad == [] and b.grad == []
    assert a.grad is not lists[0] and [g.data for g in lists[0]] == ["feedback"]
    # set_to_none=False empties in place (torch: zeroes in place), visible through references.
    lists = [a.grad, b.grad]
    a.append_grad(afnio.Variable("again"))
    opt.clear_grad(set_to_none=False)
    assert a.grad is lists[0] and lists[0] == []
    assert Append.clear_grad is Append.zero_grad


def test_step_returns_the_closure_result_computed_with_grad_enabled():
    a = params(1)[0]
    opt = Append([a])
    seen = []

    def closure():
        seen.append(afnio.is_grad_enabled())
        a.append_grad(afnio.Variable("more"))
        return ("score", "explanation")

    with afnio.no_grad():
        assert opt.step(closure) == ("score", "explanation")
    assert seen == [True]
    assert a.data == "p0!"
    assert opt.step() is None


def test_state_dict_references_parameters_by_index_across_groups():
    a, b, c = params(3)
    opt = Append([{"params": [a, b]}, {"params": [c], "suffix": "#"}])
    for p in (a, c):
        p.append_grad(afnio.Variable("x"))
    opt.step()
    saved = opt.state_dict()
    assert saved == {
        "state": {0: {"steps": 1}, 2: {"steps": 1}},
        "param_groups": [{"suffix": "!", "params": [0, 1]}, {"suffix": "#", "params": [2]}],
    }
    saved["state"][0]["steps"] = 99
    assert opt.state[a]["steps"] == 1, "state_dict must not alias the live state"


def test_state_dict_round_trip_into_a_fresh_optimizer():
    a, b, c = params(3)
    opt = Append([{"params": [a, b]}, {"params": [c], "suffix": "#"}])
    for p in (a, b, c):
        p.append_grad(afnio.Variable("x"))
    opt.step()
    opt.step()
    x, y, z = params(3, prefix="q")
    fresh = Append([{"params": [x, y]}, {"params": [z], "suffix": "&"}])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[x] == {"steps": 2} and fresh.state[z] == {"steps": 2}
    assert fresh.param_groups[1]["suffix"] == "#", "saved options replace the current ones"
    assert fresh.param_groups[0]["params"] == [x, y] and fresh.param_groups[1]["params"] == [z]
    assert fresh.state_dict() == opt.state_dict()


def test_load_state_dict_rejects_a_different_group_structure():
    a, b, c = params(3)
    saved = Append([{"params": [a, b]}, {"params": [c]}]).state_dict()
    x, y, z = params(3, prefix="q")
    one_group = Append([x, y, z])
    with pytest.raises(
        ValueError, match="loaded state dict has a different number of parameter groups"
    ):
        one_group.load_state_dict(saved)
    resized = Append([{"params": [x]}, {"params": [y, z]}])
    with pytest.raises(
        ValueError,
        match="loaded state dict contains a parameter group that doesn't match the size of "
        "optimizer's group",
    ):
        resized.load_state_dict(saved)
    assert resized.param_groups[0]["params"] == [x] and not resized.state


def test_model_clients_are_saved_by_class_and_config():
    a = params(1)[0]
    client = ScriptedModel(model="optimizer-model", latency=0.5)
    opt = Append([a], client=client)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["client"] == {
        "__model_client__": {
            "class": "afnio.testing.scripted.ScriptedModel",
            "config": {"model": "optimizer-model", "latency": 0.5},
        }
    }
    json.dumps(saved)  # plain data only

    live = ScriptedModel(model="something else")
    other = Append([params(1, "q")[0]], client=live)
    other.load_state_dict(saved)
    assert other.param_groups[0]["client"] is live, "by default the live client stays"
    other.load_state_dict(saved, load_clients=True)
    rebuilt = other.param_groups[0]["client"]
    assert isinstance(rebuilt, ScriptedModel)
    assert (rebuilt.model, rebuilt.latency) == ("optimizer-model", 0.5)

    same = ScriptedModel(model="optimizer-model", latency=0.5)
    keeper = Append([params(1, "r")[0]], client=same)
    keeper.load_state_dict(saved)
    assert keeper.param_groups[0]["client"] is same, "an equal live client is kept"


def test_repr_lists_each_group_options_sorted():
    a, b = params(2)
    opt = Append([{"params": [a]}, {"params": [b], "suffix": "#"}], momentum=2)
    assert repr(opt) == (
        "Append (\n"
        "Parameter Group 0\n"
        "    momentum: 2\n"
        "    suffix: !\n"
        "Parameter Group 1\n"
        "    momentum: 2\n"
        "    suffix: #\n"
        ")"
    )


def test_a_tampered_optimizer_state_names_no_client_and_changes_nothing(tmp_path, monkeypatch):
    # Issue 14, defects 1 and 2, through Optimizer.load_state_dict.
    import sys

    (tmp_path / "planted_opt.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a = params(1)[0]
    live = ScriptedModel(model="live")
    opt = Append([a], client=live, momentum=1)
    saved = opt.state_dict()
    saved["param_groups"][0]["momentum"] = 3
    saved["param_groups"][0]["client"] = {"__model_client__": {
        "class": "planted_opt.Client", "config": {"cache": {"path": str(tmp_path / "c" / "x")}}}}
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["client"] is live and opt.param_groups[0]["momentum"] == 3
    with pytest.raises(ValueError, match="'planted_opt.Client' is not one afnio knows"):
        opt.load_state_dict(saved, load_clients=True)
    assert "planted_opt" not in sys.modules and not (tmp_path / "RAN").exists()
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "broken",
    [
        {"state": {}, "param_groups": "nope"},
        {"state": {"0": "not a dict"}, "param_groups": None},
        {"state": {"7": {}}, "param_groups": [{"params": [0], "momentum": 5}]},
        {"state": {}, "param_groups": [{"params": ["zero"], "momentum": 5}]},
        "not a dict at all",
    ],
)
def test_a_malformed_state_is_refused_and_nothing_changes(broken):
    a = params(1)[0]
    opt = Append([a], momentum=1)
    opt.state[a] = {"history": ["kept"]}
    with pytest.raises(ValueError, match="load_state_dict|parameter groups"):
        opt.load_state_dict(broken)
    assert opt.param_groups[0]["momentum"] == 1 and opt.state[a] == {"history": ["kept"]}
