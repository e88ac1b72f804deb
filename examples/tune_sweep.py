"""Sweep optimizer settings with Ray Tune and recover the best prompt — offline, in a minute.

A ticket router learns its routing rules: its system prompt is a ``Parameter`` listing rules
like ``invoice -> billing``; an exact-match evaluator compares its team with the right one; the
backward model suggests the rules that misrouted tickets lacked, and a ``TGD`` optimizer writes
them into the prompt. Every model is a ``ScriptedModel`` (no network, no key) whose behaviour is
written below, so the sweep's outcome is known:

- the optimizer adds one suggested rule per step, one more when it sees earlier feedback
  (``momentum`` > 0: TGD then shows past iterations), and one more when it is shown an example
  of a good prompt (the ``tgd-examples`` family: ``TGD(in_context_examples=...)``);
- smaller batches mean more steps per epoch; the seed decides the order of the tickets.

The sweep is a grid over the optimizer family and momentum, with the batch size and the
loader's seed drawn for each trial (``tune.choice``, seeded search). Each trial runs
``Trainer.fit`` through ``afnio.trainer.tune.trainable``: one Tune report per epoch with the
validation score, tokens and cost, and that epoch's checkpoint. ``best_trial`` then finds the
best epoch of all trials, and its prompt is loaded into a fresh router, which is validated again
to show that the recovered prompt scores what Tune recorded.

Run:
    python examples/tune_sweep.py                 # starts a local 2-CPU Ray cluster
    python examples/tune_sweep.py --address auto  # or joins a running cluster
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from typing import Any

import afnio
from afnio import cognitive
from afnio.cognitive import Parameter, ParameterType
from afnio.optim import TGD
from afnio.testing import ScriptedModel
from afnio.trainer import Trainer
from afnio.trainer.tune import TuneJob, best_trial, trainable
from afnio.utils.data import DataLoader

TEAMS = {
    "invoice": "billing", "refund": "billing", "receipt": "billing",
    "laptop": "it", "password": "it", "printer": "it",
    "heating": "facilities", "leak": "facilities", "parking": "facilities",
}
TRAIN = [
    ("My invoice shows the wrong amount", "billing"),
    ("The heating in room 4 is off", "facilities"),
    ("I forgot my password again", "it"),
    ("When will my refund arrive?", "billing"),
    ("My laptop will not start", "it"),
    ("There is a leak above the stairs", "facilities"),
    ("I need a receipt for my taxes", "billing"),
    ("The printer on floor 2 jams", "it"),
    ("Visitors cannot find the parking", "facilities"),
]
VALIDATION = [
    ("Second invoice for the same order", "billing"),
    ("A leak in the kitchen sink", "facilities"),
    ("The new laptop has no charger", "it"),
    ("Refund for the cancelled booking", "billing"),
    ("Heating is too loud at night", "facilities"),
    ("Locked out after a password change", "it"),
    ("The receipt has the wrong address", "billing"),
    ("Printer out of toner", "it"),
    ("Parking gate will not open", "facilities"),
]
INITIAL_PROMPT = "Route each ticket to billing, it or facilities. Rules:"
ROLE = "system prompt routing support tickets to a team"
EXAMPLE_PROMPT = "Route each ticket to a team. Rules:\nscanner -> it\nelevator -> facilities"
RULE = re.compile(r"^(\w+) -> (\w+)$", re.M)
SUGGESTION = re.compile(r"Add the rule '(\w+) -> (\w+)'")


# --------------------------------------------------------------------------- scripted models
def route(messages: list[dict[str, str]], **_: Any) -> str:
    """The router model: follows the first rule whose keyword the ticket contains."""
    rules = dict(RULE.findall(messages[0]["content"]))
    ticket = messages[-1]["content"].lower()
    for keyword, team in rules.items():
        if keyword in ticket:
            return team
    return "general"


def critique(messages: list[dict[str, str]], **_: Any) -> str:
    """The backward model: suggests a rule for each misrouted keyword without one."""
    request = "\n".join(message["content"] for message in messages)
    known = set(RULE.findall(request))
    missing = [
        f"Add the rule '{keyword} -> {team}'."
        for keyword, team in TEAMS.items()
        if keyword in request.lower() and (keyword, team) not in known
    ]
    return f"<FEEDBACK>{' '.join(missing) or 'Route each ticket by its keyword.'}</FEEDBACK>"


def rewrite(messages: list[dict[str, str]], **_: Any) -> str:
    """The optimizer model: writes some of the suggested rules into the prompt."""
    request = messages[-1]["content"]
    current = re.search(r"<VARIABLE>\n?(.*?)\n?</VARIABLE>", request, re.S).group(1).strip()
    rules = RULE.findall(current)
    budget = 1 + ("<PAST_ITERATIONS>" in request) + ("<EXAMPLES>" in request)
    for suggestion in SUGGESTION.findall(request):
        if budget and suggestion not in rules:
            rules.append(suggestion)
            budget -= 1
    lines = [INITIAL_PROMPT, *(f"{keyword} -> {team}" for keyword, team in rules)]
    return "<IMPROVED_VARIABLE>" + "\n".join(lines) + "</IMPROVED_VARIABLE>"


# --------------------------------------------------------------------------- the agent
class Router(cognitive.Module):
    """Routes a batch of tickets with one chat request each; scored by exact match."""

    def __init__(self, optimizer: str = "tgd", momentum: int = 0) -> None:
        super().__init__()
        self.optimizer_family = optimizer
        self.momentum = momentum
        self.rules = Parameter(INITIAL_PROMPT, role=ROLE, param_type=ParameterType.PROMPT)
        self.router = cognitive.ChatCompletion(
            ScriptedModel(route, model="router"),
            backward_model_client=ScriptedModel(critique, model="critic"),
        )
        self.score = cognitive.ExactMatchEvaluator()

    def forward(self, tickets: afnio.Variable) -> afnio.Variable:
        return self.router(
            [{"role": "system", "content": [self.rules]}, {"role": "user", "content": ["{t}"]}],
            inputs={"t": tickets},
        )

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        tickets, teams = batch
        return self.score(self(tickets), teams)

    validation_step = training_step

    def configure_optimizers(self) -> TGD:
        examples = [EXAMPLE_PROMPT] if self.optimizer_family == "tgd-examples" else []
        return TGD(
            self.parameters(),
            model_client=ScriptedModel(rewrite, model="optimizer"),
            momentum=self.momentum,
            in_context_examples=examples,
        )


def dataset(rows: list[tuple[str, str]]) -> list[tuple[afnio.Variable, str]]:
    return [(afnio.Variable(text, role="support ticket"), team) for text, team in rows]


def build(config: dict[str, Any]) -> TuneJob:
    """One trial's job, from its hyperparameters."""
    agent = Router(config["optimizer"], config["momentum"])
    train = DataLoader(dataset(TRAIN), batch_size=config["batch_size"], shuffle=True,
                       seed=config["seed"])
    val = DataLoader(dataset(VALIDATION), batch_size=len(VALIDATION))
    return TuneJob(agent, train, val, trainer_args={
        "max_epochs": config["max_epochs"], "logger": False, "enable_report": False,
    })


# --------------------------------------------------------------------------- the sweep
def sweep(storage: str, max_epochs: int = 2) -> dict[str, Any]:
    """Run the sweep on the connected Ray cluster; return what it found."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tuner = tune.Tuner(
        trainable(build),
        param_space={
            "optimizer": tune.grid_search(["tgd", "tgd-examples"]),
            "momentum": tune.grid_search([0, 2]),
            "batch_size": tune.choice([2, 4]),
            "seed": tune.choice([0, 1, 2]),
            "max_epochs": max_epochs,
        },
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(random_state=0),
                                    reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage, name="router_sweep", verbose=0),
    )
    results = tuner.fit()
    errors = [str(result.error) for result in results if result.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} trial(s) failed: {errors}")
    trials = []
    for result in results:
        history = result.metrics_dataframe
        trials.append({
            "config": {key: result.config[key] for key in ("optimizer", "momentum",
                                                           "batch_size", "seed")},
            "val_scores": [float(score) for score in history["val_score"]],
            "requests": int(history["requests"].sum()),
        })
    best = best_trial(results, metric="val_score", mode="max")
    agent = build(best.config).agent
    agent.load_state_dict(best.agent_state)
    check = Trainer(enable_progress_bar=False, logger=False, enable_report=False,
                    enable_checkpointing=False, default_root_dir=storage)
    rescored = check.validate(agent, DataLoader(dataset(VALIDATION), batch_size=len(VALIDATION)))
    return {
        "trials": trials,
        "best": {
            "config": {key: best.config[key] for key in ("optimizer", "momentum", "batch_size",
                                                         "seed")},
            "epoch": best.metrics["epoch"],
            "val_score": best.metrics["val_score"],
            "prompt": agent.rules.data,
            "rescored": rescored["val_score"],
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster ('auto' or host:port) instead of starting one")
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="afnio-tune-") as storage:
            outcome = sweep(storage, args.max_epochs)
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps(outcome))
        return 0
    for trial in outcome["trials"]:
        print(f"{trial['config']}: val_score per epoch {trial['val_scores']}, "
              f"{trial['requests']} requests")
    best = outcome["best"]
    print(f"best: {best['config']} at epoch {best['epoch']}, val_score {best['val_score']:.3f} "
          f"(validated again after loading: {best['rescored']:.3f})")
    print("best prompt:\n" + best["prompt"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
