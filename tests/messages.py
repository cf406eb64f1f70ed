"""Chat messages for the tests: one user turn with image placeholders and a text part."""


def chat(text: str, num_images: int = 1) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]
