"""The lmms-eval model `ms_llava`: greedy, batched generation with an MS-LLaVA checkpoint.

lmms-eval finds it through the Python entry point group `lmms_eval.models` (pyproject.toml), so after
`pip install ms-llava[eval]` (and lmms-eval itself, see docs/evaluation.md)

    lmms-eval --model ms_llava --model_args pretrained=DIR --tasks pope --batch_size 8

evaluates a checkpoint directory: one saved with the package (`MSLlavaForConditionalGeneration`), or a remote-code
checkpoint with `trust_remote_code=True` in `--model_args` (then the checkpoint's own modules are run, through
transformers' Auto classes). Prompts go through the checkpoint's chat template; a batch is left-padded; samples may
carry several images. In lmms-eval's multi-process mode (`accelerate launch -m lmms_eval ...`) lmms-eval gives each
rank its share of the requests; the model only has to sit on that rank's device.

A sample whose image cannot be had (the task's `doc_to_visual` fails, or a path to a missing or unreadable file) is
answered with an empty string and counted in `unreadable` (task -> doc ids), logged at the end of the run; the run
goes on. Exact-match metrics score the empty answer wrong; POPE's precision and recall count only "yes" and "no"
answers, so there it drops out of the F1 (the count says how many).

This module imports lmms-eval; `ms_llava.evaluation` imports it only when lmms-eval asks for the class.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger  # lmms-eval's logger (what its CLI prints)
from PIL import Image
from tqdm import tqdm

from ..images import load_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(pretrained: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """(model, processor) of an MS-LLaVA checkpoint directory, in eval mode, after `check_checkpoint_folder` (files
    present and readable, processor and model agreeing on M). With `trust_remote_code` the classes its `auto_map`
    names are loaded from its own modules (as on a machine without `ms_llava`); otherwise the package's. Not the Auto
    classes: with `ms_llava` imported they resolve "ms_llava" to the package's classes even with trust_remote_code."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from ..checkpoints import check_checkpoint_folder
    from ..modeling_ms_llava import MSLlavaForConditionalGeneration
    from ..processing_ms_llava import MSLlavaProcessor

    directory = check_checkpoint_folder(pretrained, "pretrained", processor=True)
    model_class, processor_class = MSLlavaForConditionalGeneration, MSLlavaProcessor
    if trust_remote_code:
        names = {"config.json": "AutoModelForImageTextToText", "processor_config.json": "AutoProcessor"}
        references = [json.loads((directory / file).read_text()).get("auto_map", {}).get(name) for file, name in
                      names.items()]  # fmt: skip
        if None in references:
            raise ValueError(f"pretrained={pretrained}: trust_remote_code=True needs the auto_map entries {names}")
        model_class, processor_class = (get_class_from_dynamic_module(ref, directory) for ref in references)
    return model_class.from_pretrained(directory, dtype=dtype).eval(), processor_class.from_pretrained(directory)


def build_prompt(processor, context: str, num_images: int, chat_template: str | None = None) -> str:
    """The chat-template prompt of one request: `context` as the user's turn with its images. Where the context
    already holds the processor's image token (interleaved tasks) the images go there, in order; otherwise all images
    come first, then the text (LLaVA-1.5's layout). The generation prompt (the assistant's opening) is added."""
    token = processor.image_token
    if token in context:
        pieces = context.split(token)
        if len(pieces) - 1 != num_images:
            raise ValueError(f"the prompt has {len(pieces) - 1} {token} tokens but the sample has {num_images} images")
        content = []
        for index, piece in enumerate(pieces):
            if index:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
    else:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
    messages = [{"role": "user", "content": content}]
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


class MSLlavaLMMS(lmms):
    """lmms-eval's "simple" model API for MS-LLaVA: `generate_until` (greedy, batched, left-padded).

    Model args (`--model_args key=value,...`):
        pretrained: the checkpoint directory.
        trust_remote_code: load the checkpoint's own modules (default False: the package's classes).
        dtype: float32 (default), bfloat16 or float16.
        device: where the model runs (default: this rank's accelerator device, CPU without one).
        batch_size: prompts per `generate` call (lmms-eval's `--batch_size` sets it).
        chat_template: a Jinja template instead of the checkpoint's.
        max_new_tokens: a cap on the task's `max_new_tokens` (default: the task's, 128 where it gives none).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        chat_template: str | None = None,
        max_new_tokens: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        unknown = {key: value for key, value in unknown.items() if value is not None}
        if unknown:
            raise ValueError(
                f"ms_llava: unknown model_args {sorted(unknown)}; known: pretrained, trust_remote_code, dtype, "
                "device, batch_size, chat_template, max_new_tokens"
            )
        if str(dtype) not in DTYPES:
            raise ValueError(f"ms_llava: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.batch_size_per_device = int(batch_size)
        if self.batch_size_per_device < 1:
            raise ValueError(f"ms_llava: batch_size must be >= 1, got {batch_size!r}")
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        # The launcher's view (torchrun / accelerate launch set these), as lmms-eval's evaluator reads it: on CPU
        # accelerate reports one process where torchrun started several. lmms-eval hands each rank its requests.
        self._rank = int(os.environ.get("RANK", self.accelerator.process_index))
        self._world_size = int(os.environ.get("WORLD_SIZE", self.accelerator.num_processes))
        local_rank = int(os.environ.get("LOCAL_RANK", self.accelerator.local_process_index))
        if device:
            self._device = torch.device(device)
        else:
            self._device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        self.model, self.processor = load_checkpoint(pretrained, bool(trust_remote_code), DTYPES[str(dtype)])
        self.model.to(self._device)
        self.summary = (
            f"ms_llava: {type(self.model).__module__}.{type(self.model).__name__} from {pretrained} on {self._device} "
            f"(rank {self._rank} of {self._world_size}, batch size {self.batch_size_per_device})"
        )
        eval_logger.info(self.summary)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation: every prompt ends where generation starts
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"pretrained={pretrained}: the tokenizer has no pad token; batched generation needs one")
        self.chat_template = chat_template
        if chat_template is None and not self.processor.chat_template:
            raise ValueError(f"pretrained={pretrained}: the processor has no chat template; pass chat_template=...")
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.unreadable: dict[str, list] = defaultdict(list)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    @property
    def device(self) -> torch.device:
        return self._device

    # ----------------------------------------------------------------------------------------------- requests

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id) -> list[Image.Image] | None:
        """The sample's images as PIL images in their own modes (the image processor converts each mode as in training;
        a path is opened by `ms_llava.images.load_image`, as the CLI and the training set open files), or None
        (counted in `unreadable`) when any cannot be read."""
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            images = []
            for visual in visuals:
                if isinstance(visual, (str, Path)):
                    visual = load_image(visual)
                if not isinstance(visual, Image.Image):
                    raise ValueError(f"not an image: {type(visual).__name__}")
                images.append(visual)
            return images
        except Exception as error:  # a broken sample must not end a run over thousands
            self.unreadable[task].append(doc_id)
            eval_logger.warning(f"ms_llava: {task} doc {doc_id}: no readable image ({error}); answered empty")
            return None

    @torch.no_grad()
    def _generate(self, prompts: list[str], images: list[Image.Image], gen_kwargs: dict) -> list[str]:
        # Tokenised as processor.apply_chat_template tokenises in training: with the tokenizer's special tokens unless
        # the template already writes the BOS (no double BOS).
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos is not None and prompts[0].startswith(bos))
        inputs = self.processor(
            text=prompts,
            images=images or None,
            return_tensors="pt",
            padding=True,
            add_special_tokens=add_special_tokens,
        ).to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or 128)
        if self.max_new_tokens is not None:
            max_new_tokens = min(max_new_tokens, self.max_new_tokens)
        output = self.model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def generate_until(self, requests) -> list[str]:
        """Greedy answers to lmms-eval's `generate_until` requests, `args = (context, gen_kwargs, doc_to_visual,
        doc_id, task, split)`, in the requests' order. Requests with the same generation arguments are batched,
        longest prompt first (lmms-eval's `Collator`); each answer is cut at the first of the task's `until`
        strings."""
        if self.chat_template is None and self.processor.chat_template is None:
            raise ValueError("ms_llava: the checkpoint has no chat template")

        def by_length(args):
            return -len(args[0]), args[0]

        collator = lmms_utils.Collator([request.args for request in requests], by_length, grouping=True)
        answers = []
        progress = tqdm(total=len(requests), disable=self._rank != 0, desc="ms_llava responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            gen_kwargs = dict(chunk[0][1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            prompts, images, slots, batch_answers = [], [], [], [""] * len(chunk)
            for position, (context, _, doc_to_visual, doc_id, task, split) in enumerate(chunk):
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                if visuals is None:
                    continue
                prompts.append(build_prompt(self.processor, context, len(visuals), self.chat_template))
                images += visuals
                slots.append(position)
            if prompts:
                for position, text in zip(slots, self._generate(prompts, images, gen_kwargs), strict=True):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    batch_answers[position] = text.strip()
            for args, answer in zip(chunk, batch_answers, strict=True):
                self.cache_hook.add_partial("generate_until", (args[0], args[1]), answer)
            answers += batch_answers
            progress.update(len(chunk))
        progress.close()
        for task, doc_ids in self.unreadable.items():
            eval_logger.warning(f"ms_llava: {task}: {len(doc_ids)} sample(s) had no readable image: doc ids {doc_ids}")
        return collator.get_original(answers)

    def loglikelihood(self, requests):
        raise NotImplementedError("ms_llava evaluates generate_until tasks (the paper's ten are all generative)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("ms_llava does not implement multi-round generation")
