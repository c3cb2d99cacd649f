"""The training package's shape: no import circle, no recipe built on another, and a recipe written here,
outside train/, trains on the shared loop (the protocol in train/core/recipe.py is all a method needs)."""

import ast
import json
import shutil
from pathlib import Path

import torch

import tiny
from tuneforge.config.schema import Config
from tuneforge.train.recipes import RECIPES
from tuneforge.train.run import run

SRC = Path(__file__).resolve().parents[1] / "src"
QUIET = {"log": lambda *a, **k: None}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """tuneforge module -> the tuneforge modules it names in an import (at module level or inside a function)."""
    files = {module_name(p): p for p in (SRC / "tuneforge").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("tuneforge"):
                # `from pkg import sub` names the submodule when there is one, else the package itself
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                edges |= subs or ({node.module} & files.keys())
        graph[name] = edges - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_through_train():
    graph = import_graph()
    assert "tuneforge.train.core.loop" in graph and "tuneforge.train.recipes.dpo" in graph
    found = [c for c in circles(graph) if any(m.startswith("tuneforge.train") for m in c)]
    assert found == []


def test_no_recipe_subclasses_another():
    recipe_dir = SRC / "tuneforge" / "train" / "recipes"
    classes = {node.name: node for p in recipe_dir.glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.ClassDef)}
    recipes = {cls.__name__ for cls in RECIPES.values()}
    assert {"SFTRecipe", "DPORecipe", "ORPORecipe", "SimPORecipe", "KTORecipe"} <= recipes <= classes.keys()
    for name, node in classes.items():
        bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in node.bases}
        assert not bases & recipes, f"{name} subclasses {bases & recipes}"
    for cls in RECIPES.values():
        assert cls.__mro__ == (cls, object) and RECIPES[cls.name] is cls


class LastTokenRecipe:
    """Written outside train/: cross-entropy on the LAST target token of each sample only, in plain torch.
    Keeps a counter of the steps it built as its own state, saved in every checkpoint."""

    name = "last_token"
    unit = "samples"

    def batcher(self, ctx):
        from tuneforge.data.batcher import Batcher

        self.ctx, t = ctx, ctx.cfg.train
        self.steps_built = torch.zeros((), dtype=torch.long)
        return Batcher(ctx.data.train, None, t.micro_batch_size, t.grad_accum, ctx.accel.num_processes, t.seed)

    def setup(self, ctx):
        self.loaded = None

    def collate(self, samples):
        width = max(len(s.input_ids) for s in samples)
        ids = torch.tensor([s.input_ids + [self.ctx.tokenizer.pad_token_id] * (width - len(s.input_ids)) for s in samples])
        mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples])
        # position of the last trained token (label != -100) and the position that predicts it
        last = torch.tensor([max(i for i, x in enumerate(s.labels) if x != -100) for s in samples])
        target = torch.tensor([s.labels[i] for s, i in zip(samples, last.tolist())])
        return {k: v.to(self.ctx.accel.device) for k, v in
                {"input_ids": ids, "attention_mask": mask, "last": last, "target": target,
                 "real_tokens": mask.sum()}.items()}

    def batches(self, sb):
        self.steps_built += 1
        return [self.collate(mb.items) for mb in sb.micro]

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = torch.arange(len(batch["last"]), device=logits.device)
        logp = logits[rows, batch["last"] - 1].float().log_softmax(-1)
        picked = logp[rows, batch["target"]]
        return -picked.sum(), {"last_token_acc": (logp.argmax(-1) == batch["target"]).float().sum()}

    def count(self, batch):
        return len(batch["last"])

    def evaluate(self):
        return {}

    def state_dict(self):
        return {"steps_built": self.steps_built.clone()}

    def load_state_dict(self, state):
        self.loaded = state
        self.steps_built = state["steps_built"].clone()


def config(tmp_path, model, train_file, name, **train) -> Config:
    return Config.model_validate({
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(train_file)}], "eval_split": 0.0, "cache_dir": str(tmp_path / "cache")},
        "train": {"finetune": "full", "lr": 1e-2, "seed": 2, "max_steps": 8, "micro_batch_size": 4, "grad_accum": 2,
                  "save_every": 4, "keep_checkpoints": 2, "lr_scheduler": "constant", **train},
        "output": {"dir": str(tmp_path / name)},
        "tracking": {"tensorboard": False, "plot": False},
    })


def test_a_recipe_written_outside_train_runs_on_the_core_and_resumes(tmp_path, llama_dir):
    train_file = tiny.write_jsonl(tmp_path / "t.jsonl", tiny.reverse_rows(8, seed=1))  # one step's worth, seen each step
    summary = run(config(tmp_path, llama_dir, train_file, "full"), recipe=LastTokenRecipe(), **QUIET)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(r["samples"] == 8 for r in rows if "loss" in r)  # normalised by the recipe's unit
    assert losses[-1] < 0.1 * losses[0], losses  # the same 8 samples every step: the last token is learned
    assert [r for r in rows if "loss" in r][-1]["last_token_acc"] >= 0.75  # the recipe's metric, per sample
    assert summary["final_loss"] == losses[-1]
    info = json.loads((tmp_path / "full" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["recipe"] == "last_token"
    ckpt = tmp_path / "full" / "checkpoints" / "step-0000004"
    assert torch.load(ckpt / "recipe_state_0.pt", weights_only=True)["steps_built"].item() == 4

    # Resume from step 4 (as if killed after it): the recipe gets its state back, the run ends where the full one did.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-0000008")
    (crashed / "run_info.json").write_text(json.dumps({**info, "status": "running"}))
    resumed = LastTokenRecipe()
    again = run(config(tmp_path, llama_dir, train_file, "crashed"), resume=True, recipe=resumed, **QUIET)
    assert resumed.loaded["steps_built"].item() == 4 and resumed.steps_built.item() == 8
    assert abs(again["final_loss"] - summary["final_loss"]) <= 1e-6
