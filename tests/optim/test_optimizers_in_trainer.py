"""The new optimizers under the Trainer, on the routing task with the noisy optimizer model:
the closure the Trainer builds, request accounting, the per-epoch proposal counts in the
metrics and the progress bar, and exact resume."""

import io
import json
import warnings

import pytest
from rich.console import Console
from routing_task import TICKETS, backward_reply, forward_reply, new_prompt, noisy_optimizer

import afnio
from afnio import cognitive
from afnio.optim import OPRO, TGD, CandidateSearch, GatedOptimizer
from afnio.optim.tgd import ProposalRejectedWarning
from afnio.testing import ScriptedModel
from afnio.trainer import Callback, Trainer
from afnio.trainer.checkpoint import read_checkpoint, write_checkpoint
from afnio.trainer.history import read_history
from afnio.utils.data import DataLoader

BATCH = 3


class Crash(Exception):
    pass


class Router(cognitive.Module):
    def __init__(self, models, make_optimizer, crash_at=None):
        super().__init__()
        self.prompt = new_prompt()
        self.chat = cognitive.ChatCompletion(models["forward"],
                                             backward_model_client=models["backward"])
        self.evaluator = cognitive.ExactMatchEvaluator()
        self.make_optimizer = make_optimizer
        self.optimizer_model = models["optimizer"]
        self.crash_at = crash_at
        self.batches = 0

    def forward(self, tickets):
        messages = [
            {"role": "system", "content": [self.prompt]},
            {"role": "user", "content": [afnio.Variable("{ticket}", role="template")]},
        ]
        return self.chat(messages, inputs={"ticket": tickets})

    def training_step(self, batch, batch_idx):
        if afnio.is_grad_enabled():
            self.batches += 1
            if self.batches == self.crash_at:
                raise Crash(f"killed at batch {batch_idx}")
        tickets, teams = batch
        return self.evaluator(self(tickets), teams)

    def configure_optimizers(self):
        return self.make_optimizer(self)


def models(seed=0):
    return {
        "forward": ScriptedModel(forward_reply, model="forward"),
        "backward": ScriptedModel(backward_reply, model="backward"),
        "optimizer": ScriptedModel(noisy_optimizer(seed), model="optimizer"),
    }


def loader():
    data = [(afnio.Variable(text, role="ticket"), team) for text, team in TICKETS]
    return DataLoader(data, batch_size=BATCH, shuffle=True, seed=0)


def tgd(agent):
    return TGD([agent.prompt], model_client=agent.optimizer_model, momentum=1)


def fit(tmp_path, make_optimizer, epochs=3, resume_from=None, crash_at=None, clients=None,
        **trainer_options):
    clients = clients or models()
    agent = Router(clients, make_optimizer, crash_at=crash_at)
    trainer = Trainer(max_epochs=epochs, enable_progress_bar=False, default_root_dir=tmp_path,
                      **trainer_options)
    records = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, agent, outputs, batch, batch_idx):
            for optimizer in trainer._optimizers:
                records.extend(optimizer.last_step)

    trainer.callbacks.append(Record())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProposalRejectedWarning)
        trainer.fit(agent, loader(), ckpt_path=resume_from)
    return trainer, agent, clients, records


def test_gate_steps_rolls_back_harmful_steps_and_counts_them_per_epoch(tmp_path):
    trainer, agent, clients, records = fit(tmp_path, tgd, gate_steps=True)
    optimizer = trainer._optimizers[0]
    assert isinstance(optimizer, GatedOptimizer)
    rows = [row for row in trainer.metrics_log.rows if row["stage"] == "fit"]
    verdicts = [record["verdict"] for record in records]
    assert sum(row["accepted"] for row in rows) == verdicts.count("accepted") > 0
    assert sum(row["rolled_back"] for row in rows) == verdicts.count("rolled_back") > 0
    assert sum(row["rejected"] for row in rows) == (
        verdicts.count("rejected") + verdicts.count("rolled_back"))
    state = optimizer.state[agent.prompt]
    assert (state["accepted"], state["rejected"]) == (
        verdicts.count("accepted"), len(verdicts) - verdicts.count("accepted"))
    for record in records:  # the training batch's score never drops across a kept step
        if record["verdict"] == "accepted":
            assert record["score_after"] >= record["score_before"]
        elif record["verdict"] == "rolled_back":
            assert record["score_after"] < record["score_before"]
            assert record["after"] != record["before"]  # the proposal that was undone

    # Requests, exactly: each batch costs BATCH forward requests, plus BATCH more to re-score a
    # proposal that changed the prompt (the score before is the training step's own), one
    # backward and one optimizer request per batch with a failing ticket.
    batches = trainer.global_step
    changed = sum(record["verdict"] in ("accepted", "rolled_back") for record in records)
    assert clients["forward"].calls == BATCH * batches + BATCH * changed
    assert clients["backward"].calls == clients["optimizer"].calls == len(records)
    total = sum(row["requests"] for row in rows)
    assert total == sum(model.calls for model in clients.values())
    # The run history (what the HTML report shows) has every verdict, and the proposal a
    # rolled-back step undid.
    entries = [entry for step in read_history(tmp_path).steps for entry in step["params"]]
    assert [entry["verdict"] for entry in entries] == verdicts
    undone = [entry for entry in entries if entry["verdict"] == "rolled_back"]
    assert all(entry["proposal"] != entry["after"] == entry["before"] for entry in undone)


def test_a_checkpoint_with_broken_proposal_counts_is_refused_before_anything_loads(tmp_path):
    trainer, agent, clients, _ = fit(tmp_path, tgd, epochs=1, gate_steps=True)
    path = tmp_path / "checkpoints" / "last.ckpt"
    state = read_checkpoint(path)
    state["proposals"] = {"accepted": -1}
    write_checkpoint(state, tmp_path / "broken.ckpt")
    fresh = Router(models(), tgd)
    before = fresh.prompt.data
    with pytest.raises(ValueError, match="'proposals' must map"):
        Trainer(max_epochs=2, enable_progress_bar=False, default_root_dir=tmp_path / "again",
                gate_steps=True).fit(fresh, loader(), ckpt_path=tmp_path / "broken.ckpt")
    assert fresh.prompt.data == before


def test_the_progress_bar_and_epoch_lines_show_the_counts(tmp_path):
    output = io.StringIO()
    agent = Router(models(), tgd)
    trainer = Trainer(max_epochs=1, default_root_dir=tmp_path, gate_steps=True,
                      console=Console(file=output, width=200))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProposalRejectedWarning)
        trainer.fit(agent, loader())
    row = trainer.metrics_log.rows[-1]
    text = output.getvalue()
    assert f"accepted {row['accepted']} · rejected {row['rejected']}" in text
    assert f"proposals accepted {row['accepted']}, rejected {row['rejected']}" in text


def test_a_gated_run_resumes_exactly_mid_epoch(tmp_path):
    full, full_agent, _, _ = fit(tmp_path / "full", tgd, gate_steps=True)
    clients = models()
    with pytest.raises(Crash):
        fit(tmp_path / "run", tgd, gate_steps=True, crash_at=7, clients=clients,
            checkpoint_every_n_batches=1)
    resumed, agent, _, _ = fit(tmp_path / "run", tgd, gate_steps=True, clients=clients,
                               resume_from=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert agent.prompt.data == full_agent.prompt.data
    assert json.dumps(resumed._optimizers[0].state_dict(), sort_keys=True) == json.dumps(
        full._optimizers[0].state_dict(), sort_keys=True)
    keys = ("epoch", "train_score", "accepted", "rejected", "rolled_back")
    assert [[row[k] for k in keys] for row in resumed.metrics_log.rows] == [
        [row[k] for k in keys] for row in full.metrics_log.rows]


def search(agent):
    return CandidateSearch([agent.prompt], model_client=agent.optimizer_model, num_proposals=3,
                           num_paraphrases=1, beam_width=2, seed=0)


def test_candidate_search_scores_on_copies_of_the_agent_and_resumes_exactly(tmp_path):
    full, full_agent, clients, records = fit(tmp_path / "full", search, epochs=2)
    assert all(rule in full_agent.prompt.data for rule in ("password -> account", "crash ->"))
    assert full_agent.batches == full.global_step  # scoring ran on copies, not on the agent
    rows = [row for row in full.metrics_log.rows if row["stage"] == "fit"]
    assert sum(row["requests"] for row in rows) == sum(m.calls for m in clients.values())
    assert clients["optimizer"].calls == 4 * len(records)
    assert sum(row["accepted"] + row["rejected"] for row in rows) == len(records)

    run_clients = models()
    with pytest.raises(Crash):
        fit(tmp_path / "run", search, epochs=2, crash_at=6, clients=run_clients,
            checkpoint_every_n_batches=1)
    resumed, agent, _, _ = fit(tmp_path / "run", search, epochs=2, clients=run_clients,
                               resume_from=tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert agent.prompt.data == full_agent.prompt.data
    assert resumed._optimizers[0].state_dict()["state"] == full._optimizers[0].state_dict()[
        "state"]


def test_opro_uses_the_trainers_closure(tmp_path):
    def opro(agent):
        return OPRO([agent.prompt], model_client=agent.optimizer_model, history_size=4)

    trainer, agent, clients, records = fit(tmp_path, opro, epochs=2)
    history = trainer._optimizers[0].state[agent.prompt]["history"]
    assert history and all(isinstance(entry["score"], float) for entry in history)
    kept = [r for r in records if r["verdict"] == "accepted"]
    assert all(r["score_after"] >= r["score_before"] for r in kept)
    assert {r["verdict"] for r in records} <= {"accepted", "rolled_back", "rejected"}
