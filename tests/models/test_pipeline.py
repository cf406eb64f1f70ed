import torch
from transformers import pipeline

from messages import chat


def test_pipeline_with_chat_messages(tiny_dir, tiny, image):
    model, processor = tiny
    pipe = pipeline("image-text-to-text", model=str(tiny_dir), device="cpu")
    assert type(pipe.model).__name__ == "MSLlavaForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    result = pipe(text=messages, generate_kwargs={"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False})
    generated = result[0]["generated_text"]
    assert generated[-1]["role"] == "assistant" and generated[-1]["content"]

    # the same answer as calling generate on the model directly
    prompt = processor.apply_chat_template(chat("What?"), add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)[
        0, inputs["input_ids"].shape[1] :
    ]
    assert generated[-1]["content"] == processor.decode(tokens, skip_special_tokens=True).lstrip(" ")


def test_pipeline_replies_start_without_the_separating_space():
    """LLaVA-1.5's replies follow "ASSISTANT:" after a space that their first token carries; the reply is the answer."""
    import ms_llava
    from ms_llava.testing_utils import sample_image

    path = str(ms_llava.default_checkpoint_path())
    pipe = pipeline("image-text-to-text", model=path, device="cpu")
    content = [
        {"type": "image", "image": sample_image(size=64, seed=3)},
        {"type": "text", "text": "How many objects?"},
    ]
    settings = {"max_new_tokens": 3, "do_sample": False}
    reply = pipe(text=[{"role": "user", "content": content}], generate_kwargs=settings)[0]["generated_text"][-1]
    assert reply["content"] and not reply["content"][0].isspace()
    prompt = pipe.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = pipe.processor(images=content[0]["image"], text=prompt, return_tensors="pt")
    tokens = pipe.model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :]
    assert pipe.processor.decode(tokens, skip_special_tokens=True).startswith(" ")  # the space is the model's
    assert reply["content"] == pipe.processor.decode(tokens, skip_special_tokens=True).strip()


def test_pipeline_with_images_and_text(tiny_dir, tiny, image):
    model, processor = tiny
    pipe = pipeline("image-text-to-text", model=str(tiny_dir), device="cpu")
    prompt = "USER: <image>\nDescribe. ASSISTANT:"
    result = pipe(
        images=image,
        text=prompt,
        return_full_text=False,
        generate_kwargs={"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False},
    )
    assert result[0]["generated_text"]
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
    assert result[0]["generated_text"] == processor.decode(tokens, skip_special_tokens=True).lstrip(" ")
