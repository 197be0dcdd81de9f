"""Write (and optionally generate) the randomised train / val / test split of issue 13 to split.json.

    python examples/make_split.py --work WORK                     # WORK/split.json only
    python examples/make_split.py --work WORK --generate --jobs 8 # and the archives (cached: existing files are kept)
    python examples/make_split.py --work WORK --roles test --n-test 10 --frames 41 --hr-size 128 --generate

The split measures generalisation: one scene family (``--held-out-family``, default ``debris``: objects that
enter and leave the field) and one detector effect (``--held-out-effect``, default ``flicker``: a beam that
flickers and drifts) are never used in the training or validation archives, only in test archives.

* train / val: seeds 20000+i / 25000+i. Scene: 1-3 moving families drawn from every family of
  xvr_batch.synth except the held-out one (the extra families meltpool, spatter, collide, occluder included).
  Effects: with probability 1 - ``--plain-fraction`` a random subset (each with p = 1/2) of the effects other
  than the held-out one, else none (the plain generator the shipped weights were trained on). Speeds and doses
  random (synth's ranges; the ``dose`` effect widens them). dtypes cycle uint16, uint16, uint8, uint16, float32.
* test: seeds 29000+i, cycling over five categories:
  ``seen`` (seen families, seen effects), ``held_out_family`` (the held-out family, alone or with a seen one;
  seen effects), ``held_out_effect`` (seen families; the held-out effect plus random seen ones), ``both``, and
  ``plain`` (old families, no effects: the shipped weights' own distribution).

Everything is a pure function of the arguments, so the same command writes the same split.json, and the
archives are pure functions of their generator arguments (each entry's ``args``, passed to
``xvr_batch.synth.synthesize``). Each entry: path, role, seed, families, effects, dtype, category,
held_out_family, held_out_effect, args.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xvr_batch import synth  # noqa: E402

SPLIT_FORMAT = "xvr_batch.split/2"
DTYPES = ["uint16", "uint16", "uint8", "uint16", "float32"]
CATEGORIES = ["seen", "held_out_family", "held_out_effect", "both", "plain"]
SEED_BASE = {"train": 20000, "val": 25000, "test": 29000}


def _pick(rng: np.random.Generator, pool: list[str], k_max: int = 3) -> list[str]:
    k = int(rng.integers(1, min(k_max, len(pool)) + 1))
    idx = sorted(rng.choice(len(pool), size=k, replace=False).tolist())
    return [pool[i] for i in idx]


def _effects(rng: np.random.Generator, pool: list[str]) -> list[str]:
    return [e for e, u in zip(pool, rng.random(len(pool))) if u < 0.5]


def build_split(work: str, n_train: int = 64, n_val: int = 4, n_test: int = 15, n_frames: int = 81,
                hr_size: int = 256, stride: int = 20, held_out_family: str = "debris",
                held_out_effect: str = "flicker", plain_fraction: float = 0.25, split_seed: int = 13,
                roles: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """The split as a dict (see the module docstring); nothing is generated."""
    if held_out_family not in synth.ALL_MOVING_FAMILIES:
        raise SystemExit(f"--held-out-family {held_out_family!r}: choose from {', '.join(synth.ALL_MOVING_FAMILIES)}")
    if held_out_effect not in synth.EFFECTS:
        raise SystemExit(f"--held-out-effect {held_out_effect!r}: choose from {', '.join(synth.EFFECTS)}")
    seen_fams = [f for f in synth.ALL_MOVING_FAMILIES if f != held_out_family]
    old_fams = [f for f in synth.MOVING_FAMILIES if f != held_out_family]
    seen_fx = [e for e in synth.EFFECTS if e != held_out_effect]
    base = dict(n_frames=int(n_frames), hr_shape=[int(hr_size), int(hr_size)], stride=int(stride))
    split: dict = {"format": SPLIT_FORMAT, "held_out_family": held_out_family, "held_out_effect": held_out_effect,
                   "seen_families": seen_fams, "seen_effects": seen_fx, "plain_fraction": plain_fraction,
                   "split_seed": split_seed, "generator": base, "train": [], "val": [], "test": []}
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for role in ("train", "val", "test"):
        if role not in roles:
            continue
        for i in range(int(counts[role])):
            seed = SEED_BASE[role] + i
            # one stream per archive: adding archives never changes the earlier ones
            rng = np.random.default_rng(np.random.SeedSequence(split_seed, spawn_key=(seed,)))
            if role == "test":
                cat = CATEGORIES[i % len(CATEGORIES)]
                dtype = "uint16"
                if cat == "plain":
                    fams, fx = _pick(rng, old_fams), []
                else:
                    fams = _pick(rng, seen_fams)
                    if cat in ("held_out_family", "both"):
                        fams = sorted({held_out_family, *(_pick(rng, seen_fams, 1) if rng.random() < 0.5 else [])},
                                      key=synth.ALL_MOVING_FAMILIES.index)
                    fx = _effects(rng, seen_fx)
                    if cat in ("held_out_effect", "both"):
                        fx = [e for e in synth.EFFECTS if e in fx or e == held_out_effect]
            else:
                cat = "train" if role == "train" else "val"
                dtype = DTYPES[i % len(DTYPES)] if role == "train" else "uint16"
                fams = _pick(rng, seen_fams)
                fx = _effects(rng, seen_fx) if rng.random() >= plain_fraction else []
            args = dict(base, seed=seed, families=fams, dtype=dtype, **({"effects": fx} if fx else {}))
            split[role].append({
                "path": os.path.join(work, role, f"{role}_{seed:05d}.h5"), "role": role, "seed": seed,
                "families": fams, "effects": fx, "dtype": dtype, "category": cat,
                "held_out_family": held_out_family in fams, "held_out_effect": held_out_effect in fx, "args": args})
    return split


def _make(entry: dict) -> str:
    path = entry["path"]
    if not os.path.exists(path):  # cached: archives are pure functions of their arguments
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kw = dict(entry["args"])
        kw["hr_shape"] = tuple(kw["hr_shape"])
        synth.synthesize(path, **kw)  # atomic: the file is complete or absent
    return path


def generate(split: dict, jobs: int = 1) -> int:
    """Generate the archives of ``split`` that do not exist yet; returns how many there are."""
    entries = [e for role in ("train", "val", "test") for e in split.get(role, [])]
    if jobs <= 1:
        for e in entries:
            _make(e)
    else:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_make, entries))
    return len(entries)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder of the archives; split.json is written there")
    ap.add_argument("--out", default=None, help="split file [WORK/split.json]")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=4)
    ap.add_argument("--n-test", type=int, default=15)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--hr-size", type=int, default=256)
    ap.add_argument("--stride", type=int, default=20)
    ap.add_argument("--held-out-family", default="debris")
    ap.add_argument("--held-out-effect", default="flicker")
    ap.add_argument("--plain-fraction", type=float, default=0.25,
                    help="fraction of train/val archives without effects")
    ap.add_argument("--split-seed", type=int, default=13)
    ap.add_argument("--roles", default="train,val,test", help="comma-separated subset of train,val,test")
    ap.add_argument("--generate", action="store_true", help="also generate the missing archives")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    work = os.path.abspath(a.work)
    roles = tuple(r.strip() for r in a.roles.split(",") if r.strip())
    split = build_split(work, a.n_train, a.n_val, a.n_test, a.frames, a.hr_size, a.stride, a.held_out_family,
                        a.held_out_effect, a.plain_fraction, a.split_seed, roles)
    os.makedirs(work, exist_ok=True)
    out = a.out or os.path.join(work, "split.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(split, f, indent=1)
    os.replace(tmp, out)
    msg = (f"{out}: {len(split['train'])} train, {len(split['val'])} val, {len(split['test'])} test archives "
           f"({a.frames} frames, HR {a.hr_size}x{a.hr_size}, key frames every {a.stride}); held out: family "
           f"{a.held_out_family}, effect {a.held_out_effect}")
    print(msg, flush=True)
    if a.generate:
        n = generate(split, a.jobs)
        print(f"generated / found {n} archives under {work}", flush=True)


if __name__ == "__main__":
    main()
