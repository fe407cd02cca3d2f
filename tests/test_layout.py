"""The package's layout rules (issue 22): imports at module top, except the ones named here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "fedmllm"

# Imported inside functions on purpose, each for its reason:
LAZY = {
    # heavy: seconds and GBs; the ClientApp process and the CLI's light commands never load them
    "torch": "heavy",
    "transformers": "heavy",
    "peft": "heavy",
    "bitsandbytes": "heavy",
    "matplotlib": "heavy",
    "wandb": "heavy",
    "safetensors.torch": "imports torch",
    "sklearn": "heavy (about a second)",
    "datasets": "heavy (pyarrow, pandas)",
    "flwr_datasets": "imports datasets",
    "ray": "heavy; only the CLI's stop path",
    # Flower: the algorithms, the client's round and bench/gpu.py run where flwr is not installed,
    # and the CLI's commands that run no Flower start without importing it
    "flwr": "Flower",
    "fedmllm.records": "imports flwr",
    "fedmllm.strategies.fused": "imports flwr",
    "fedmllm.strategies.wrapper": "imports flwr",
    "fedmllm.server.run": "imports flwr",
    "fedmllm.server.app": "imports flwr",
    "fedmllm.client.app": "imports flwr",
    "fedmllm.simulation": "imports flwr (after setting its environment)",
    "dp_accounting": "heavy (about a second: scipy, mpmath); only a run with privacy on reads it",
    "fedmllm.strategies.private": "imports flwr",
    "easy_vqa": "an optional package: its absence is reported with the fix",
    # the one-message flwr-clientapp process: it imports config and the worker client only
    "fedmllm.client.rounds": "imports data, models, algorithms and tqdm; the ClientApp loads it only to train in-process",
    "hydra": "about 0.3 s; only the functions that compose a config need it, the ClientApp does not",
    "omegaconf": "imported with Hydra, for the same reason",
}


def _lazy(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LAZY)


def test_imports_are_at_module_top_except_the_heavy_and_flower_bound_ones():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {n}" for n in names if not _lazy(n)]
    assert not found, "import these at module top (or name the reason in LAZY):\n" + "\n".join(found)
