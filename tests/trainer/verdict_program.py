"""The program the run-history, report and logger tests train: two prompts, two models, and an
optimizer that follows the ``last_step`` verdict contract."""

from __future__ import annotations

import afnio
from afnio.autodiff.basic_ops import Add
from afnio.autodiff.evaluator import DeterministicEvaluator
from afnio.cognitive import Module, Parameter
from afnio.optim import Optimizer
from afnio.testing import ScriptedModel
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader

SECRET = "sk-test-0123456789abcdef-SECRET"
FORWARD, OPTIMIZER = "openai/gpt-4.1-mini", "anthropic/claude-haiku-4-5"


class PricedModel(ScriptedModel):
    """A scripted model billed at a real provider's prices (``provider/model`` from ``label``)."""

    def __init__(self, label, replies, **options):
        provider, model = label.split("/")
        super().__init__(replies, model=model, **options)
        self.provider = provider


class VerdictOptimizer(Optimizer):
    """Appends ``|s<step>`` to each parameter that got feedback, asking its model once per
    parameter. The first parameter's proposals are accepted; the second's are alternately
    rejected and rolled back (its value stays), with a reason — the ``last_step`` contract."""

    def __init__(self, params, client, expose=True, **options):
        super().__init__(params, {"client": client, **options})
        self.client = client
        self.expose = expose
        self.seen_feedback = []  # per step: {index: [feedback texts]}

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        counter = self.state[params[0]]  # saved in state_dict, so a resumed run counts on
        counter["steps"] = self.steps = counter.get("steps", 0) + 1
        report, seen = [], {}
        for index, param in enumerate(params):
            feedback = [g.data for g in param.grad if g.data]
            if not feedback:
                continue
            seen[index] = feedback
            self.client.chat([{"role": "user", "content": f"improve {param.role}"}])
            before, proposal = param.data, f"{param.data}|s{self.steps}"
            if index == 0:
                verdict, reason = "accepted", None
            elif self.steps % 2:
                verdict, reason = "rejected", f"placeholder lost at step {self.steps}"
            else:
                verdict, reason = "rolled_back", f"minibatch score fell at step {self.steps}"
            if verdict == "accepted":
                with afnio.no_grad():
                    param.copy_(proposal)
            report.append(
                {
                    "index": index,
                    "role": param.role,
                    "before": before,
                    "after": proposal,
                    "feedback": feedback,
                    "verdict": verdict,
                    "reason": reason,
                }
            )
        self.seen_feedback.append(seen)
        if self.expose:
            self.last_step = report


def divisible_by_four(prediction, target):
    return int(int(target[1:]) % 4 == 0)


class Agent(Module):
    """Two prompts joined to each question; its own model is asked once per batch."""

    def __init__(self, forward, optimizer_client, expose=True, crash_at=None, hidden_at=None):
        super().__init__()
        self.prefix = Parameter("Answer <b>briefly</b>.", role="answer prefix")
        self.style = Parameter("Be polite.", role="answer style")
        self.forward_client = forward
        self.optimizer_client = optimizer_client
        self.expose = expose
        self.crash_at = crash_at
        self.hidden_at = hidden_at
        self.trainer_ref = None
        self.scores = []

    def forward(self, questions):
        return Add.apply(Add.apply(self.prefix, self.style), questions)

    def evaluate(self, batch):
        questions, answers = batch
        self.forward_client.chat([{"role": "user", "content": " ".join(questions.data)}])
        return DeterministicEvaluator.apply(
            self(questions), answers, divisible_by_four, "divisibility", lambda s: s == 1
        )

    def training_step(self, batch, batch_idx):
        epoch = self.trainer_ref.current_epoch if self.trainer_ref else None
        if self.crash_at == (epoch, batch_idx):
            self.forward_client.chat([{"role": "user", "content": "spent before the crash"}])
            raise RuntimeError(f"crash at batch {batch_idx}")
        if self.hidden_at == (epoch, batch_idx):  # a client the Trainer cannot see
            ScriptedModel(["x"], model="hidden").chat([{"role": "user", "content": "h"}])
        score, explanation = self.evaluate(batch)
        self.scores.append(score.data / len(batch[1]))
        return score, explanation

    def validation_step(self, batch, batch_idx):
        return self.evaluate(batch)

    def configure_optimizers(self):
        return VerdictOptimizer(
            [self.prefix, self.style],
            self.optimizer_client,
            expose=self.expose,
            api_key=SECRET,
            completion_args={"temperature": 0.0, "api_key": SECRET},
        )


DATA = [(afnio.Variable(f"q{i}", role="question"), f"a{i}") for i in range(1, 13)]


def loaders():
    return DataLoader(DATA, batch_size=3, shuffle=True, seed=3), DataLoader(DATA[:4], batch_size=2)


def make(run_dir, max_epochs=2, **kwargs):
    trainer = Trainer(max_epochs=max_epochs, default_root_dir=run_dir, enable_progress_bar=False)
    agent = Agent(
        PricedModel(FORWARD, ["ok"] * 500),
        PricedModel(OPTIMIZER, ["ok"] * 500),
        **kwargs,
    )
    agent.trainer_ref = trainer
    return trainer, agent


def fitted(run_dir, **kwargs):
    trainer, agent = make(run_dir, **kwargs)
    trainer.fit(agent, *loaders())
    return trainer, agent
