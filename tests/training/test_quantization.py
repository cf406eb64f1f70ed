"""QLoRA on CPU (bitsandbytes 4-bit) and the import hygiene around bitsandbytes.

transformers' `TrainingArguments` imports peft, peft imports bitsandbytes, and bitsandbytes' CPU backend logs "Failed
to load CPU gemm_4bit_forward from kernels-community ..." on import where the `kernels` package is missing. The
commands that do not train must not import it; training holds that line back and QLoRA on CPU says once what is
missing and what it costs.
"""

import subprocess
import sys
from unittest import mock

import pytest
import torch

from ms_llava.training import adapters
from ms_llava.training.arguments import MSLlavaTrainingArguments

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the test extra installs it)")

BITSANDBYTES_LINE = "Failed to load CPU gemm_4bit_forward"
HEAVY = ("ms_llava.training", "bitsandbytes", "peft", "transformers.training_args")
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # a fresh interpreter: about 10 s on 2 shared cores
def test_help_leaves_training_out_and_training_holds_back_the_bitsandbytes_line():
    """`ms-llava --help` imports neither the training command nor peft / bitsandbytes / TrainingArguments; importing
    the training package and peft afterwards prints no bitsandbytes line, and where bitsandbytes tried its fused CPU
    kernel and failed, the QLoRA note names what is missing and the cost."""
    code = (
        "import sys\nfrom ms_llava_cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', [name for name in {HEAVY!r} if name in sys.modules])\n"
        "import ms_llava.training, peft\nfrom ms_llava.training.adapters import cpu_4bit_kernel_note\n"
        "print('NOTE', cpu_4bit_kernel_note())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout and "train with the paper's two-stage recipe" in done.stdout
    assert BITSANDBYTES_LINE not in done.stdout + done.stderr
    if "NOTE None" not in done.stdout:  # bitsandbytes tries its fused kernel only on CPUs with AVX512-BF16
        assert "`kernels`" in done.stdout and "slower" in done.stdout, done.stdout


def test_a_command_line_naming_train_lists_its_options(capsys):
    from ms_llava_cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--qlora" in capsys.readouterr().out


def test_qlora_needs_bitsandbytes_but_no_gpu():
    adapters.require_qlora_support()  # bitsandbytes is installed; no CUDA device is needed
    real_find_spec = adapters.importlib.util.find_spec
    missing = lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args)  # noqa: E731
    with mock.patch.object(adapters.importlib.util, "find_spec", side_effect=missing):
        with pytest.raises(ValueError, match=r"qlora needs bitsandbytes \(pip install"):
            adapters.require_qlora_support()


def test_the_qlora_base_keeps_tower_resampler_and_head_unquantized(tiny_dir):
    import bitsandbytes as bnb

    model = adapters.load_model(str(tiny_dir), MSLlavaTrainingArguments.for_stage("finetune", qlora=True))
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = name.split(".")[1] if name.startswith("model.") else name
            kinds.setdefault(part, set()).add(type(module))
    assert kinds == {
        "vision_tower": {torch.nn.Linear},
        "multi_modal_projector": {torch.nn.Linear},
        "language_model": {bnb.nn.Linear4bit},
        "lm_head": {torch.nn.Linear},
    }
    assert {param.dtype for param in model.parameters() if param.is_floating_point()} == {torch.float32}


@pytest.mark.slow  # about 40 s on 2 shared cores, 10-15 s of it bitsandbytes' torch.compile of its dequantization
def test_qlora_trains_on_cpu_and_the_adapter_reloads_on_a_fresh_4bit_base(tmp_path, caplog, monkeypatch):
    from peft import PeftModel
    from transformers import AutoProcessor, TrainerCallback

    from ms_llava.testing_utils import sample_image, write_shapes_dataset
    from ms_llava.training import train
    from quantized_tiny import write_tiny64_checkpoint

    monkeypatch.setattr(adapters, "_NOTED", [])  # the note is said once per process: count it in this test
    caplog.set_level("WARNING")
    base = write_tiny64_checkpoint(tmp_path / "tiny64")
    data = write_shapes_dataset(tmp_path / "data", "qa", 32, seed=1)
    inputs = dict(AutoProcessor.from_pretrained(base)(images=sample_image(48, 1), text=PROMPT, return_tensors="pt"))

    class LogitsAtTheEnd(TrainerCallback):
        logits = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                LogitsAtTheEnd.logits = model(**inputs, use_cache=False).logits
            model.train()

    with torch.no_grad():
        before = (
            adapters.load_model(str(base), MSLlavaTrainingArguments.for_stage("finetune", qlora=True))
            .eval()(**inputs, use_cache=False)
            .logits
        )
    options = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2, projector_learning_rate=1e-3)
    run = dict(global_batch_size=8, per_device_batch_size=8, max_steps=8, logging_steps=1, save_steps=1000)
    result = train(
        base,
        "finetune",
        data,
        tmp_path / "data" / "images",
        tmp_path / "qlora",
        qlora=True,
        callbacks=[LogitsAtTheEnd()],
        dataloader_num_workers=0,
        warmup_ratio=0.0,
        **options,
        **run,
    )
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 8 and losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))
    assert result.adapter and (tmp_path / "qlora" / "adapter_model.safetensors").is_file()

    fresh = adapters.load_model(str(base), MSLlavaTrainingArguments.for_stage("finetune", qlora=True))
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "qlora").eval()
    with torch.no_grad():
        logits = reloaded(**inputs, use_cache=False).logits
    # The 4-bit layers compute in bfloat16 (relative precision 2**-8), and bitsandbytes' CPU kernels do not give the
    # same numbers on every call: measured, two passes of one reloaded model differ by up to 1.6e-3, two fresh reloads
    # agree bit for bit. A wrong or missing adapter tensor moves the logits by far more (training moved them).
    torch.testing.assert_close(logits, LogitsAtTheEnd.logits, rtol=0, atol=4e-3)
    assert (LogitsAtTheEnd.logits - before).abs().max() > 10 * 4e-3
    notes = [record for record in caplog.records if "kernels-community" in record.getMessage()]
    # three 4-bit loads, one note (where bitsandbytes tried its fused CPU kernel after ms_llava.training was imported)
    tried = adapters.cpu_4bit_kernel_note() is not None
    assert len(notes) == int(tried) and all(BITSANDBYTES_LINE not in record.getMessage() for record in notes)
