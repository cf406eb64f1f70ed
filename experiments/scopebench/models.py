"""The model parts of ScopeBench: tokenizer, vision encoder (and its training objective), language model, and the
assembly of MS-LLaVA and LLaVA (MLP projector) checkpoints from them.

Vision encoder. A `CLIPVisionModel` at ScopeBench's resolution (336 px, patch 14: a 24 x 24 grid), 2 layers of width
64. It is trained once on generated images (the ``encoder`` split, disjoint from train / val / test) with a **dense
per-patch objective**: three linear heads read every patch token of the last layer (the layer the projector reads)
and predict the colour (none or one of six) and the shape (none or one of three) of the object whose 3 x 3 block holds
the patch, and the digit (none or 1-9) drawn in that patch; cross-entropy, summed. The heads are then thrown away and
the tower is frozen for everything after. Why this objective: the paper's regime is a frozen CLIP tower whose patch
tokens carry local content; a tower trained from scratch by a global objective (a caption, a count) could pool the
evidence anywhere and leave the grid without spatial meaning, and then no spatial prior in the projector could
matter. Dense labels make token (y, x) describe what lies at (y, x), as CLIP's patch tokens roughly do.

Language model. A `LlamaForCausalLM` of width 128 (3 layers) with a byte-level BPE tokenizer trained on ScopeBench's
words. It first gets a text-only warm-up (shared by every variant, `ms_llava.training.train` stage ``finetune`` on
``text-train.json``): it learns the language of the task and to answer from a scene description standing where the
image will be, as a pre-trained LLM brings its own language to the paper's stage 1.

Grid warm-up (an exploration, `grid_warm_up`): the text-warmed LM further trained to answer from an "oracle" grid, a
G x G sequence of input vectors standing where the M visual tokens will be, each the sum of the word embeddings of
what lies in that cell of the image (G = 6, 8, 12: the query grids of M = 36, 64, 144). It tells whether the language
model can find one token among M, apart from whether a projector delivers it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from ms_llava.configuration_ms_llava import MSLlavaConfig
from ms_llava.image_processing_ms_llava import MSLlavaImageProcessor
from ms_llava.modeling_ms_llava import MSLlavaForConditionalGeneration
from ms_llava.processing_ms_llava import MSLlavaProcessor
from ms_llava.testing_utils import train_bpe_tokenizer

from . import generator as sb

ENCODER_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": sb.IMAGE_SIZE,
    "patch_size": sb.PATCH,
    "projection_dim": 64,
}
LM_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
RESAMPLER_DEFAULTS = {"hidden_size": 64, "num_attention_heads": 4, "fusion_hidden_size": 16}
VISION_FEATURE_LAYER = -1  # the tower's last layer, the one its objective trains


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (396 tokens: trained towards 420, it runs out of pairs to merge) on the words of ScopeBench and LLaVA's chat template."""
    corpus = ["USER: ASSISTANT: " + sb.CAPTION_PROMPT]
    for index in range(200):
        scene = sb.make_scene(0, index)
        corpus.append(scene.caption())
        corpus += [f"{q.question} {q.answer}" for q in scene.questions]
    return train_bpe_tokenizer(corpus, vocab_size=420)


def image_processor() -> MSLlavaImageProcessor:
    size = sb.IMAGE_SIZE
    return MSLlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# --------------------------------------------------------------------------------------------- the encoder


class DensePatchHeads(nn.Module):
    """The encoder's training heads (thrown away after training): colour, shape and digit per patch token."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, len(sb.COLOURS) + 1)
        self.shape = nn.Linear(width, len(sb.SHAPES) + 1)
        self.digit = nn.Linear(width, len(sb.DIGITS) + 1)

    def forward(self, tokens):
        return {"colour": self.colour(tokens), "shape": self.shape(tokens), "digit": self.digit(tokens)}


def encoder_scene(index: int) -> sb.Scene:
    """Image `index` of the encoder's training set: a scene of the ``encoder`` split in which every object carries a
    digit (random, seeded), so that the tower sees several digits per image."""
    scene = sb.make_scene(sb.SPLIT_SEEDS["encoder"], index)
    rng = random.Random(f"scopebench-encoder-digits-{index}")
    objects = tuple(dataclasses.replace(o, digit=o.digit or rng.choice(sb.DIGITS)) for o in scene.objects)
    return dataclasses.replace(scene, objects=objects)


def _encoder_batch(processor, scenes, device="cpu"):
    pixels = processor([sb.render(s) for s in scenes], return_tensors="pt")["pixel_values"].to(device)
    labels = [sb.patch_labels(s) for s in scenes]
    return pixels, {key: torch.stack([lab[key] for lab in labels]).flatten(1).to(device) for key in labels[0]}


def train_encoder(
    output_dir: str | Path,
    num_images: int = 1024,
    epochs: int = 6,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log=print,
) -> dict:
    """Trains the ScopeBench vision tower with the dense per-patch objective, saves it (`save_pretrained`, frozen
    weights only) to `output_dir` and returns its per-patch accuracies on 128 held-out images."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = image_processor()
    tower = CLIPVisionModel(CLIPVisionConfig(**ENCODER_CONFIG)).to(device)
    heads = DensePatchHeads(ENCODER_CONFIG["hidden_size"]).to(device)
    scenes = [encoder_scene(i) for i in range(num_images + 128)]
    train_scenes, held_out = scenes[:num_images], scenes[num_images:]
    # Pre-render once: the images are the same every epoch.
    batches = [
        _encoder_batch(processor, train_scenes[i : i + batch_size], device) for i in range(0, num_images, batch_size)
    ]
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    total = epochs * len(batches)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=total, pct_start=0.1)
    # The digit class is rare (one patch per object): weight its non-empty classes up.
    digit_weight = torch.ones(len(sb.DIGITS) + 1)
    digit_weight[1:] = 10.0
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        tower.train()
        for batch_index in torch.randperm(len(batches), generator=generator).tolist():
            pixels, labels = batches[batch_index]
            tokens = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER][:, 1:]
            logits = heads(tokens)
            loss = sum(
                nn.functional.cross_entropy(
                    logits[key].flatten(0, 1), labels[key].flatten(), weight=digit_weight if key == "digit" else None
                )
                for key in logits
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 20 == 0 or step == total:
                log(f"encoder step {step}/{total} epoch {epoch + 1} loss {loss.item():.4f}")
    metrics = evaluate_encoder(tower, heads, processor, held_out, device)
    metrics["mean_feature_norm_removed"] = round(centre_features(tower, batches[:8]), 3)
    metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    metrics["objective"] = "dense per-patch cross-entropy: colour (7), shape (4), digit (10) of every patch token"
    output_dir = Path(output_dir)
    tower.cpu().save_pretrained(output_dir)
    (output_dir / "encoder_metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    log(f"encoder: {metrics}")
    return metrics


@torch.no_grad()
def centre_features(tower, batches) -> float:
    """Centres the tower's output features: subtracts their mean over the patch tokens of `batches` (images and
    positions) from the bias of the last layer's MLP output, which adds straight into the residual stream, and returns
    the norm of the mean removed. A tower trained from scratch carries a large constant vector in every token (norm
    about 27, against about 3.5 for the part that varies); a projector then outputs mostly that constant, the
    language model's RMSNorm scales the image-dependent part down to a few percent, and nothing downstream learns to
    read the image (what we saw before this step). CLIP's features are centred by its final layer norm; this is
    the frozen-tower equivalent for the layer the projector reads."""
    tower.eval()
    features = torch.cat(
        [
            tower(pixel_values=p, output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER][:, 1:]
            for p, _ in batches
        ]
    )
    mean = features.flatten(0, 1).mean(0)
    tower.get_submodule("encoder").layers[-1].mlp.fc2.bias -= mean
    return mean.norm().item()


@torch.no_grad()
def evaluate_encoder(tower, heads, processor, scenes, device="cpu") -> dict:
    """Per-patch accuracy of each head; for digits, on the patches that hold one."""
    tower.eval()
    pixels, labels = _encoder_batch(processor, scenes, device)
    tokens = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[VISION_FEATURE_LAYER][:, 1:]
    logits = heads(tokens)
    out = {}
    for key in logits:
        predicted = logits[key].argmax(-1)
        out[f"{key}_patch_accuracy"] = round((predicted == labels[key]).float().mean().item(), 4)
    mask = labels["digit"] > 0
    out["digit_accuracy_on_digit_patches"] = round(
        (logits["digit"].argmax(-1)[mask] == labels["digit"][mask]).float().mean().item(), 4
    )
    return out


# --------------------------------------------------------------------------------------------- checkpoints


def text_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **LM_CONFIG,
    )


def build_ms_llava(encoder_dir, language_model, tokenizer, resampler: dict, seed: int = 0):
    """(model, processor): MS-LLaVA with the trained tower of `encoder_dir` (None: a random one), the language model `language_model` (a
    `LlamaForCausalLM`, or None for a random one) and a fresh projector of `resampler` (on top of
    `RESAMPLER_DEFAULTS`), initialised with `seed`."""
    if encoder_dir is None:  # a random tower: for the text-only warm-up, whose tower is never used
        vision = CLIPVisionModel(CLIPVisionConfig(**ENCODER_CONFIG))
    else:
        vision = CLIPVisionModel.from_pretrained(encoder_dir)
    config = MSLlavaConfig(
        vision_config=vision.config,
        text_config=language_model.config if language_model is not None else text_config(tokenizer),
        resampler_config={**RESAMPLER_DEFAULTS, **resampler},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=VISION_FEATURE_LAYER,
    )
    torch.manual_seed(seed)
    model = MSLlavaForConditionalGeneration(config)
    _load_parts(model, vision, language_model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = MSLlavaProcessor(
        image_processor=image_processor(), tokenizer=tokenizer, num_image_tokens=config.resampler_config.num_queries
    )
    return model.eval(), processor


def build_llava_mlp(encoder_dir, language_model, tokenizer, seed: int = 0):
    """(model, processor): transformers' LLaVA (its 2-layer MLP projector over all 576 tokens) with the same tower and
    language model. The processor is `MSLlavaProcessor` with `num_image_tokens=576` (the same image processor, chat
    template and tokenizer; each `<image>` becomes 576 placeholders, as `LlavaProcessor` would expand it):
    `ms_llava.training`'s pre-pass reads `processor.num_image_tokens`, which `LlavaProcessor` does not have."""
    vision = CLIPVisionModel.from_pretrained(encoder_dir)
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=language_model.config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _load_parts(model, vision, language_model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = MSLlavaProcessor(
        image_processor=image_processor(), tokenizer=tokenizer, num_image_tokens=sb.GRID * sb.GRID
    )
    return model.eval(), processor


def _load_parts(model, vision, language_model) -> None:
    model.model.vision_tower.load_state_dict(vision.state_dict())
    if language_model is not None:
        model.model.language_model.load_state_dict(language_model.model.state_dict())
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())


def language_model_from(checkpoint_dir) -> LlamaForCausalLM:
    """The language model (decoder + head) of a saved MS-LLaVA checkpoint, as a `LlamaForCausalLM`."""
    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(checkpoint_dir, dtype=torch.float32)
    lm = LlamaForCausalLM(full.config.text_config)
    lm.model.load_state_dict(full.model.language_model.state_dict())
    lm.lm_head.load_state_dict(full.lm_head.state_dict())
    return lm


# --------------------------------------------------------------------------------------------- grid warm-up

GRID_SIDES = (6, 8, 12)  # the query grids of M = 36, 64, 144


def grid_cells(scene: dict, side: int) -> list[list[str]]:
    """Words of what lies in each cell of a `side` x `side` grid over the 24 x 24 patch grid, in raster order: an
    object's colour and shape in every cell its block touches, its digit in the cell of its centre patch."""
    sb.patch_cell(0, 0, side)  # refuses a side that does not divide the patch grid
    cells: list[list[str]] = [[] for _ in range(side * side)]
    for obj in scene["objects"]:
        touched = {
            sb.patch_cell(r, c, side)
            for r in range(obj["row"], obj["row"] + sb.BLOCK)
            for c in range(obj["col"], obj["col"] + sb.BLOCK)
        }
        for cell in sorted(touched):
            cells[cell] += [obj["colour"], obj["shape"]]
        if obj["digit"]:
            cells[sb.patch_cell(*sb.centre_patch(obj), side)].append(obj["digit"])
    return cells


class _GridBatcher:
    """LLaVA-JSON records (with their `scene`) -> input vectors with the `<image>` token replaced by an oracle grid."""

    def __init__(self, tokenizer, image_token_id: int, embeddings: nn.Embedding):
        self.tokenizer, self.image_token_id, self.embeddings = tokenizer, image_token_id, embeddings
        self.word_ids: dict[str, int] = {}

    def word_id(self, word: str) -> int:
        if word not in self.word_ids:
            ids = self.tokenizer.encode(" " + word, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"grid word {word!r} is not one token: {ids}")
            self.word_ids[word] = ids[0]
        return self.word_ids[word]

    def encode(self, record: dict, side: int, prompt_only: bool = False):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if not prompt_only:
            answer = record["conversations"][1]["value"]
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        encoded = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=not prompt_only,
            add_generation_prompt=prompt_only,
        )  # fmt: skip
        ids = list(encoded["input_ids"])
        mask = list(encoded.get("assistant_masks", [0] * len(ids)))
        at = ids.index(self.image_token_id)
        cells = [[self.word_id(w) for w in words] for words in grid_cells(record["scene"], side)]
        ids = ids[:at] + [self.image_token_id] * len(cells) + ids[at + 1 :]
        mask = mask[:at] + [0] * len(cells) + mask[at + 1 :]
        return ids, mask, at, cells

    def batch(self, items):
        """Right-padded (inputs_embeds, attention_mask, labels) for `encode` outputs; empty cells are zero vectors."""
        length = max(len(ids) for ids, *_ in items)
        ids = torch.full((len(items), length), self.tokenizer.pad_token_id)
        labels = torch.full((len(items), length), -100)
        attention = torch.zeros((len(items), length), dtype=torch.long)
        for b, (seq, mask, _, _) in enumerate(items):
            ids[b, : len(seq)] = torch.tensor(seq)
            attention[b, : len(seq)] = 1
            labels[b, : len(seq)] = torch.where(torch.tensor(mask).bool(), torch.tensor(seq), -100)
        weight = self.embeddings.weight
        embeds = self.embeddings(ids).clone()
        for b, (_, _, at, cells) in enumerate(items):
            embeds[b, at : at + len(cells)] = torch.stack(
                [weight[cell].sum(0) if cell else weight.new_zeros(weight.shape[1]) for cell in cells]
            )
        return embeds, attention, labels


@torch.no_grad()
def grid_accuracy(lm, batcher: _GridBatcher, records: list[dict], side: int) -> dict[str, float]:
    """Per question type: how often the greedy first answer token after the prompt, with an oracle grid, is right."""
    was_training = lm.training
    lm.eval()
    right: dict[str, list[bool]] = {}
    for start in range(0, len(records), 50):
        chunk = records[start : start + 50]
        items = [batcher.encode(r, side, prompt_only=True) for r in chunk]
        embeds, attention, _ = batcher.batch(items)
        logits = lm(inputs_embeds=embeds, attention_mask=attention).logits
        for b, record in enumerate(chunk):
            token = int(logits[b, len(items[b][0]) - 1].argmax())
            predicted = batcher.tokenizer.decode([token]).strip()
            right.setdefault(record["types"][0], []).append(predicted == record["conversations"][1]["value"])
    lm.train(was_training)
    return {kind: sum(v) / len(v) for kind, v in sorted(right.items())}


def grid_warm_up(source, output, data, steps: int = 3000, lr: float = 1e-3, batch_size: int = 16, seed: int = 0,
                 eval_questions: int = 400, log=print) -> dict:  # fmt: skip
    """Trains the language model of the warm-up checkpoint `source` on oracle grids (the stage-2 questions and stage-1
    captions of `data`'s train split, one grid side from `GRID_SIDES` per batch; AdamW, one-cycle lr, grad-norm clip
    1) and saves the MS-LLaVA checkpoint with that LM to `output`. Returns (and writes to `grid_warmup.json`) the grid
    accuracy by side and question type on the first `eval_questions` validation questions, before and after."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    data = Path(data)
    processor = AutoProcessor.from_pretrained(source)
    lm = language_model_from(source)
    batcher = _GridBatcher(processor.tokenizer, processor.image_token_id, lm.get_input_embeddings())
    questions = json.loads((data / "qa-train.json").read_text(encoding="utf-8"))
    scenes = sb.scenes_by_image(data / "qa-train.json")
    captions = json.loads((data / "caption-train.json").read_text(encoding="utf-8"))
    records = questions + [{**c, "scene": scenes[c["image"]]} for c in captions]
    val = json.loads((data / "qa-val.json").read_text(encoding="utf-8"))[:eval_questions]
    report = {"before": {side: grid_accuracy(lm, batcher, val, side) for side in GRID_SIDES}}
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    started = time.perf_counter()
    lm.train()
    for step in range(steps):
        side = rng.choice(GRID_SIDES)
        embeds, attention, labels = batcher.batch(
            [batcher.encode(rng.choice(records), side) for _ in range(batch_size)]
        )
        loss = lm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 500 == 0 or step == steps - 1:
            log(f"grid warm-up step {step}: loss {loss.item():.4f}, {time.perf_counter() - started:.0f} s")
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["after"] = {side: grid_accuracy(lm, batcher, val, side) for side in GRID_SIDES}
    full = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    full.model.language_model.load_state_dict(lm.model.state_dict())
    full.lm_head.load_state_dict(lm.lm_head.state_dict())
    full.save_pretrained(output)
    processor.save_pretrained(output)
    (Path(output) / "grid_warmup.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report
