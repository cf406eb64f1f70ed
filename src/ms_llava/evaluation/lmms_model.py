"""The lmms-eval model `ms_llava` (`lmms-eval --model ms_llava --model_args pretrained=DIR --tasks pope`): greedy,
batched (left-padded) generation with an MS-LLaVA checkpoint through its chat template, several images per sample
allowed; in lmms-eval's multi-process mode each rank answers its share of the requests. A sample whose image cannot be
had is answered with an empty string and its doc id counted in `unreadable`; the run goes on.
"""

from __future__ import annotations

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

DTYPES = ("float32", "bfloat16", "float16")


def load_checkpoint(pretrained: str, trust_remote_code: bool = False, dtype: str = "float32"):
    """(model, processor) of a checkpoint folder that `check_checkpoint_folder` passes, in eval mode: the package's
    classes, or with `trust_remote_code` those its `auto_map` names from its own modules (not the Auto classes, which
    resolve "ms_llava" to the package's classes whenever it is imported)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from ..checkpoints import check_checkpoint_folder, read_json
    from ..modeling_ms_llava import MSLlavaForConditionalGeneration
    from ..processing_ms_llava import MSLlavaProcessor

    directory = check_checkpoint_folder(pretrained, "pretrained", processor=True)
    model_class, processor_class = MSLlavaForConditionalGeneration, MSLlavaProcessor
    if trust_remote_code:
        names = {"config.json": "AutoModelForImageTextToText", "processor_config.json": "AutoProcessor"}
        references = [read_json(directory / file).get("auto_map", {}).get(name) for file, name in names.items()]
        if None in references:
            raise ValueError(f"pretrained={pretrained}: trust_remote_code=True needs the auto_map entries {names}")
        model_class, processor_class = (get_class_from_dynamic_module(ref, directory) for ref in references)
    return model_class.from_pretrained(directory, dtype=dtype).eval(), processor_class.from_pretrained(directory)


def build_prompt(processor, context: str, num_images: int, chat_template: str | None = None) -> str:
    """The chat-template prompt of one request, the generation prompt added: the images where the context holds the
    processor's image token (interleaved tasks), else all first, then the text (LLaVA-1.5's layout)."""
    token = processor.image_token
    pieces = context.split(token) if token in context else [""] * num_images + [context]
    if len(pieces) - 1 != num_images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {token} tokens but the sample has {num_images} images")
    content = [
        part
        for index, piece in enumerate(pieces)
        for part in [{"type": "image"}] * (index > 0) + [{"type": "text", "text": piece.strip()}] * bool(piece.strip())
    ]
    kwargs = {"chat_template": chat_template} if chat_template else {}
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


class MSLlavaLMMS(lmms):
    """lmms-eval's "simple" model API for MS-LLaVA: `generate_until`. Model args: `pretrained` (a checkpoint folder),
    `trust_remote_code`, `dtype` (float32, bfloat16, float16), `device` (default: this rank's accelerator, else CPU),
    `batch_size`, `chat_template` (instead of the checkpoint's), `max_new_tokens` (a cap on the task's; 128 where the
    task gives none)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        trust_remote_code=False,
        dtype="float32",
        device=None,
        batch_size=1,
        chat_template=None,
        max_new_tokens=None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown := sorted(key for key, value in unknown.items() if value is not None):
            raise ValueError(
                f"ms_llava: unknown model_args {unknown}; known: pretrained, trust_remote_code, dtype, "
                "device, batch_size, chat_template, max_new_tokens"
            )
        if str(dtype) not in DTYPES or int(batch_size) < 1:
            raise ValueError(
                f"ms_llava: dtype must be one of {DTYPES} (got {dtype!r}), batch_size >= 1 (got {batch_size!r})"
            )
        from accelerate import Accelerator

        self.accelerator, self.batch_size = Accelerator(), int(batch_size)
        # The launcher's view (torchrun / accelerate launch set these), as lmms-eval's evaluator reads it: on CPU
        # accelerate reports one process where torchrun started several. lmms-eval hands each rank its requests.
        self._rank = int(os.environ.get("RANK", self.accelerator.process_index))
        self._world_size = int(os.environ.get("WORLD_SIZE", self.accelerator.num_processes))
        local_rank = int(os.environ.get("LOCAL_RANK", self.accelerator.local_process_index))
        self.device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor = load_checkpoint(pretrained, bool(trust_remote_code), str(dtype))
        self.model.to(self.device)
        self.summary = (
            f"ms_llava: {type(self.model).__module__}.{type(self.model).__name__} from {pretrained} on {self.device} "
            f"(rank {self._rank} of {self._world_size}, batch size {self.batch_size})"
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

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id) -> list[Image.Image] | None:
        """The sample's images (paths opened by `load_image`, as every command opens files), or None (counted in
        `unreadable`) when one cannot be read."""
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            images = [load_image(visual) if isinstance(visual, (str, Path)) else visual for visual in visuals]
            if others := [type(image).__name__ for image in images if not isinstance(image, Image.Image)]:
                raise ValueError(f"not an image: {', '.join(others)}")
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
        options = {"return_tensors": "pt", "padding": True, "add_special_tokens": add_special_tokens}
        inputs = self.processor(text=prompts, images=images or None, **options).to(self.device, self.model.dtype)
        max_new_tokens = min(int(gen_kwargs.get("max_new_tokens") or 128), self.max_new_tokens or 2**31)
        options = {"do_sample": False, "num_beams": 1, "pad_token_id": self.tokenizer.pad_token_id}
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **options)
        return self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def generate_until(self, requests) -> list[str]:
        """Greedy answers to lmms-eval's `generate_until` requests, `args = (context, gen_kwargs, doc_to_visual,
        doc_id, task, split)`, in the requests' order. Requests with the same generation arguments are batched,
        longest prompt first (lmms-eval's `Collator`); each answer is cut at the first of the task's `until`
        strings."""
        collator = lmms_utils.Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
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
            generated = self._generate(prompts, images, gen_kwargs) if prompts else []
            for position, text in zip(slots, generated, strict=True):
                for stop in filter(None, until):
                    text = text.split(stop)[0]
                batch_answers[position] = text.strip()
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
