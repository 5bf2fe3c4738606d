"""Build the merge set: SmolLM2-135M and two short full fine-tunes of it on different domains.

Run: .venv/bin/python bench/make_merge_set.py [--steps 40] [--seq-len 128] [--batch 4]

About 7 s a step on 2 CPU cores with one torch thread (5 minutes a domain at the defaults).

* base: the default model (SmolLM2-135M-Instruct, bf16; `weightsmith fetch-demo-model`), copied
  into the set with ``architectures`` in its config.json (mergekit needs it).
* shakespeare: fine-tuned on Tiny Shakespeare (../shared/assets/text/tinyshakespeare.txt).
* python: fine-tuned on Python source from this interpreter's standard library (the top-level
  ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, in sorted order).

Each domain's text is cut in two at a line break: the last ``--heldout`` share is written to
``<domain>-heldout.txt`` (for `weightsmith eval --text`), the rest is tokenized for training.
Training is plain AdamW on every parameter in float32, batches drawn by seed; the result is saved
in the base's dtype beside its config and tokenizer. Outputs are cached under
``$XDG_CACHE_HOME/weightsmith/merge-set/`` in a folder named after the settings, so a second run
only prints the paths (``--force`` rebuilds). The last line printed is JSON: the folders and texts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weightsmith.checkpoint import Checkpoint, CheckpointWriter  # noqa: E402
from weightsmith.data import normalize, tokenize  # noqa: E402
from weightsmith.demo import fetch_demo_model  # noqa: E402
from weightsmith.models import load_model, load_tokenizer  # noqa: E402
from weightsmith.paths import asset, cache_dir  # noqa: E402
from weightsmith.provenance import Record  # noqa: E402

log = logging.getLogger("make_merge_set")


def shakespeare_text() -> str:
    path = asset("text/tinyshakespeare.txt")
    if path is None:
        raise SystemExit("Tiny Shakespeare not found in the shared assets (set WEIGHTSMITH_ASSETS)")
    return normalize(path.read_text(encoding="utf-8"))


def python_text(max_bytes: int) -> str:
    """Top-level stdlib modules in sorted order, up to ``max_bytes`` of text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = normalize(path.read_text(encoding="utf-8", errors="replace"))
        parts.append(f"# {path.name}\n{text}")
        size += len(text)
        if size >= max_bytes:
            break
    return "\n\n".join(parts)


DOMAINS = {"shakespeare": lambda args: shakespeare_text(), "python": lambda args: python_text(args.python_bytes)}


def split(tokenizer, text: str, heldout: float) -> tuple[torch.Tensor, str]:
    """Training token ids of the first part of the text, and the held-out rest as text (cut at the
    line break nearest to the ``heldout`` share of characters from the end)."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - heldout))) + 1
    return tokenize(tokenizer, text[:cut]), text[cut:]


def fine_tune(base: Path, tokens: torch.Tensor, dest: Path, args: argparse.Namespace, domain: str) -> dict:
    """Full fine-tune of ``base`` on ``tokens``; written to ``dest`` in the base's dtype."""
    torch.manual_seed(args.seed)
    model = load_model(base, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n_blocks = tokens.numel() // args.seq_len
    all_blocks = tokens[: n_blocks * args.seq_len].view(n_blocks, args.seq_len)
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = all_blocks[torch.randint(n_blocks, (args.batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        log.info("%s step %d/%d loss %.3f (%.1f s)", domain, step + 1, args.steps, losses[-1], time.perf_counter() - start)
    src = Checkpoint(base)
    state = model.state_dict()
    record = Record(
        "fine-tune", {"domain": domain, **{k: getattr(args, k) for k in ("steps", "seq_len", "batch", "lr", "heldout")}}, seed=args.seed
    )
    record.add_input(src.folder, src.files, src.provenance)
    record.figures.update({"first_loss": losses[0], "last_loss": losses[-1], "train_tokens": int(tokens.numel())})
    config = {**src.config, "architectures": [type(model).__name__]}
    with CheckpointWriter(dest, source=base, config=config, record=record, force=True) as writer:
        for name in src.names():
            writer.add(name, state[name].detach().to(src.info(name).dtype).contiguous())
    return {"first_loss": losses[0], "last_loss": losses[-1], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--heldout", type=float, default=0.1, help="share of each domain's tokens kept out of training")
    parser.add_argument("--python-bytes", type=int, default=1_500_000, help="characters of stdlib source in the python domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a small shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="folder of the merge set (default: in the cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("steps", "seq_len", "batch", "lr", "heldout", "python_bytes", "seed")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = args.out or cache_dir() / "merge-set" / f"smollm2-{key}"
    base = out / "base"
    if args.force or not (base / "model.safetensors").exists():
        demo = Checkpoint(fetch_demo_model())
        config = {**demo.config, "architectures": demo.config.get("architectures") or ["LlamaForCausalLM"]}
        out.mkdir(parents=True, exist_ok=True)
        with CheckpointWriter(base, source=demo.folder, config=config, force=True) as writer:
            for name in demo.names():
                writer.copy_from(demo, name)
    tokenizer = load_tokenizer(base)
    result: dict = {"base": str(base), "settings": settings}
    for domain, make_text in DOMAINS.items():
        folder, heldout_path = out / domain, out / f"{domain}-heldout.txt"
        if args.force or not (folder / "model.safetensors").exists() or not heldout_path.exists():
            if folder.exists():
                shutil.rmtree(folder)
            out.mkdir(parents=True, exist_ok=True)
            train, heldout = split(tokenizer, make_text(args), args.heldout)
            heldout_path.write_text(heldout, encoding="utf-8")
            log.info("%s: %d training tokens, %d held-out characters", domain, train.numel(), len(heldout))
            result[f"{domain}_training"] = fine_tune(base, train, folder, args, domain)
        result[domain] = str(folder)
        result[f"{domain}_heldout"] = str(heldout_path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
