"""Writers of small datasets in the real on-disk formats (Hateful Memes, CrisisMMD, LLaVA JSON),
for tests and benchmarks. Images are tiny solid-colour PNG/JPEG files encoded once and copied.

With `broken=True` the writers append known bad rows after the good ones of the training file,
in the order of `BROKEN_*`, so a test knows each one's line.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from fedmllm.data import crisismmd, hateful_memes

COLORS = ((220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (30, 30, 30), (200, 200, 200))
CORRUPT = b"not an image: these bytes are no PNG or JPEG header\n"
# Kinds of the appended bad rows, as the loaders name them in their drop summaries.
BROKEN_HATEFUL = ("bad JSON", "missing field", "unknown label", "missing image", "corrupt image")
BROKEN_CRISISMMD = ("bad TSV row", "unknown label", "missing image", "corrupt image")
BROKEN_LLAVA = ("unknown label", "missing field", "missing image", "corrupt image")
TSV_COLUMNS = (
    "event_name",
    "tweet_id",
    "image_id",
    "tweet_text",
    "image",
    "label",
    "label_text",
    "label_image",
    "label_text_image",
)
EVENTS = ("hurricane_harvey", "california_wildfires", "mexico_earthquake")


def _encoded(fmt: str) -> list[bytes]:
    out = []
    for c in COLORS:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), c).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def _held_out(n_rows: int) -> int:
    return max(4, n_rows // 10)


def photo(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG of `width` x `height` that looks like a photo to a processor (smooth colour
    gradients under noise), not a flat square: what resolution and token-budget tests need."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, 3)
    tilt = rng.uniform(-0.15, 0.15, (3, 2))
    rgb = np.stack([base[c] + tilt[c, 0] * x * 255 / width + tilt[c, 1] * y * 255 / height for c in range(3)], -1)
    rgb += rng.normal(0, 12, rgb.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_hateful_memes(
    root: str | Path,
    n_rows: int = 20,
    seed: int = 0,
    broken: bool = False,
    photo_sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """`root/img/*.png` + the five split files; `train.jsonl` has `n_rows` rows, the others
    max(4, n_rows // 10). Ids alternate between ints and zero-padded strings (both occur in
    the real release). `broken`: `BROKEN_HATEFUL` rows at lines n_rows+1 ... of train.jsonl.
    `photo_sizes`: the images are photo-like JPEGs of these (width, height) sizes in turn
    (the memes' own sizes vary this way), instead of 16 px squares."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng, pngs, next_id = random.Random(seed), _encoded("PNG"), 1
    if photo_sizes:
        pngs = [photo(w, h, seed + i) for i, (w, h) in enumerate(photo_sizes)]
    for split in hateful_memes.SPLITS:
        lines = []
        for _ in range(n_rows if split == "train" else _held_out(n_rows)):
            i, next_id = next_id, next_id + 1
            img = f"img/{i:05d}.png"
            (root / img).write_bytes(pngs[i % len(pngs)] if photo_sizes else rng.choice(pngs))
            row_id: int | str = i if i % 2 == 0 else f"{i:05d}"
            words = " ".join(rng.choice(("look", "at", "this", "meme", "today", "friends")) for _ in range(5))
            lines.append(json.dumps({"id": row_id, "img": img, "label": rng.randint(0, 1), "text": words}))
        if broken and split == "train":
            (root / "img" / "99995.png").write_bytes(CORRUPT)
            lines += [
                '{"id": 99991, "img": "img/99991.png", "label": 0, "text": "cut off',
                json.dumps({"id": 99992, "img": "img/99992.png", "text": "no label field"}),
                json.dumps({"id": 99993, "img": "img/99993.png", "label": 7, "text": "label seven"}),
                json.dumps({"id": 99994, "img": "img/99994.png", "label": 1, "text": "image not on disk"}),
                json.dumps({"id": 99995, "img": "img/99995.png", "label": 1, "text": "image corrupt"}),
            ]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_crisismmd(
    root: str | Path,
    task: str = "humanitarian",
    n_rows: int = 20,
    seed: int = 0,
    agreed: bool = False,
    broken: bool = False,
) -> Path:
    """`root/crisismmd_datasplit_all/task_<task>_text_img_{train,dev,test}.tsv` + JPEGs under
    `root/data_image/<event>/<date>/`; train has `n_rows` rows, dev/test max(4, n_rows // 10).
    Tweets carry t.co URLs. `agreed`: also the agreed-label files (the rows whose text and image
    labels agree) under `crisismmd_datasplit_agreed_label/`. `broken`: `BROKEN_CRISISMMD` rows
    at lines n_rows+2 ... of the train file (line 1 is the header)."""
    root = Path(root)
    labels = crisismmd.LABELS[task]
    rng, jpgs, tweet = random.Random(seed), _encoded("JPEG"), 917791000000000000
    all_dir, agreed_dir = root / crisismmd.ALL_DIR, root / crisismmd.AGREED_DIRS[0]
    all_dir.mkdir(parents=True, exist_ok=True)
    for split in crisismmd.SPLITS:
        rows = []
        for _ in range(n_rows if split == "train" else _held_out(n_rows)):
            tweet += 1
            event = rng.choice(EVENTS)
            image = f"data_image/{event}/8_9_2017/{tweet}_0.jpg"
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            (root / image).write_bytes(rng.choice(jpgs))
            text_label = rng.choice(labels)
            image_label = text_label if rng.random() < 0.7 else rng.choice(labels)
            agree = "Positive" if text_label == image_label else "Negative"
            text = f"RT @news: {event.replace('_', ' ')} update {tweet % 1000} https://t.co/x{tweet % 97} #help"
            rows.append((event, str(tweet), f"{tweet}_0", text, image, text_label, text_label, image_label, agree))
        good = ["\t".join(r) for r in rows]
        lines = list(good)
        if broken and split == "train":
            bad_img = f"data_image/{EVENTS[0]}/8_9_2017/1_0.jpg"
            (root / bad_img).write_bytes(CORRUPT)
            lines += [
                "\t".join(rows[0][:4]),  # a row cut short: 4 of 9 fields
                "\t".join((*rows[0][:2], "2_0", "a tweet", rows[0][4], "flood_memes", "flood_memes", "x", "Negative")),
                "\t".join((*rows[0][:2], "3_0", "a tweet", "data_image/none/3_0.jpg", *[labels[0]] * 3, "Positive")),
                "\t".join((*rows[0][:2], "1_0", "a tweet", bad_img, labels[0], labels[0], labels[0], "Positive")),
            ]
        header = "\t".join(TSV_COLUMNS)
        (all_dir / f"task_{task}_text_img_{split}.tsv").write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
        if agreed:
            agreed_dir.mkdir(parents=True, exist_ok=True)
            kept = [line for line, r in zip(good, rows) if r[-1] == "Positive"]
            path = agreed_dir / f"task_{task}_text_img_agreed_lab_{split}.tsv"
            path.write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")
    return root


def write_llava_json(
    path: str | Path, n_rows: int = 20, seed: int = 0, labels: tuple[str, ...] = ("no", "yes"), broken: bool = False
) -> Path:
    """A LLaVA conversation JSON array at `path`, images under `path.parent/images/`; every
    fifth record has no image (text-only). `broken`: `BROKEN_LLAVA` records after the good
    ones, one per line, then a truncated record (bad JSON, which ends the file)."""
    path = Path(path)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    rng, pngs = random.Random(seed), _encoded("PNG")

    def record(i: int, answer: str, image: str | None, human: str = "<image>\nIs the shape round?") -> dict:
        rec: dict = {"id": f"rec-{i}"}
        if image:
            rec["image"] = image
        rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
        return rec

    records = []
    for i in range(n_rows):
        image = None
        if i % 5 != 4:
            image = f"images/{i:04d}.png"
            (path.parent / image).write_bytes(rng.choice(pngs))
        records.append(
            record(i, rng.choice(labels), image, "<image>\nIs the shape round?" if image else "Is it round?")
        )
    if broken:
        (path.parent / "images" / "corrupt.png").write_bytes(CORRUPT)
        records += [
            record(n_rows, "maybe", None, "Is it round?"),
            {"id": f"rec-{n_rows + 1}", "image": "images/0000.png"},
            record(n_rows + 2, labels[0], "images/absent.png"),
            record(n_rows + 3, labels[0], "images/corrupt.png"),
        ]
    body = ",\n".join(json.dumps(r) for r in records)
    tail = ',\n{"id": "cut", "conversations": [' if broken else ""
    path.write_text(f"[\n{body}{tail}\n]\n" if not broken else f"[\n{body}{tail}\n", encoding="utf-8")
    return path


COLOR_NAMES = ("red", "green", "blue", "yellow", "black", "white")


def write_hf_vqa(root: str | Path, n_rows: int = 24, seed: int = 0) -> Path:
    """A Hugging Face dataset saved with `save_to_disk` under `root` (train + test splits): an
    Image column of solid-colour PNGs (bytes inside the dataset, no files), a `question` and an
    open-ended `answer` ("red", ...) or yes/no, as in VQA-RAD and SLAKE."""
    import datasets

    rng, pngs = random.Random(seed), _encoded("PNG")

    def rows(n: int) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "question": [], "answer": []}
        for i in range(n):
            c = rng.randrange(len(COLORS))
            out["image"].append({"bytes": pngs[c], "path": None})
            if i % 2:
                out["question"].append("What colour is the image?")
                out["answer"].append(COLOR_NAMES[c])
            else:
                asked = rng.randrange(len(COLORS))
                out["question"].append(f"Is the image {COLOR_NAMES[asked]}?")
                out["answer"].append("yes" if asked == c else "no")
        return out

    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(n_rows), features=features),
            "test": datasets.Dataset.from_dict(rows(_held_out(n_rows)), features=features),
        }
    )
    ds.save_to_disk(str(root))
    return Path(root)


def write_imagefolder(
    root: str | Path, n_rows: int = 24, seed: int = 0, classes: tuple[str, ...] = ("cat", "dog")
) -> Path:
    """An image folder as `datasets`' imagefolder reads it: `root/{train,test}/<class>/<n>.png`."""
    root, rng, pngs = Path(root), random.Random(seed), _encoded("PNG")
    for split, n in (("train", n_rows), ("test", _held_out(n_rows))):
        for i in range(n):
            label = rng.randrange(len(classes))
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(pngs[label % len(pngs)])
    return root
