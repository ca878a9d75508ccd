"""The local Hugging Face judge on a tiny random-init Gemma 3 (MedGemma's architecture) built offline.

These tests check the plumbing (loading from a folder, batching, the prompt carrying the image, decoding and
parsing), not the quality of the answers: the model is random.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from checklist_builders import gated_checklist
from magic_align.config import JudgeConfig
from magic_align.judges import make_judge
from magic_align.judges.hf_judge import HFJudge, HFJudgeLoadError

CHECKLIST = gated_checklist(
    "vitiligo",
    ("lesion", "lesion", "A depigmented patch is visible."),
    ("border", "shape", "The patch is well defined."),
    ("color", "color", "The patch is white."),
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_gemma3(folder) -> None:
    """A 60k-parameter Gemma 3 VLM with a character-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    vocab = {token: index for index, token in enumerate(specials + [chr(code) for code in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_seq_length=4)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=4096, sliding_window=64,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14),
        mm_tokens_per_image=4,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    build_tiny_gemma3(folder)
    return folder


def config(folder, **overrides) -> JudgeConfig:
    values = dict(backend="hf", model=str(folder), image_size=48, hf_batch_size=2, prompt_style="paper", max_output_tokens=12)
    values.update(overrides)
    return JudgeConfig(**values)


def images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (64, 40), (30 * index % 256, 200, 120)) for index in range(count)]


def test_random_model_gives_a_verdict_with_a_parse_status(tiny_vlm):
    judge = make_judge(config(tiny_vlm, hf_batch_size=3), checklists=None)
    assert isinstance(judge, HFJudge)
    assert judge._model is None  # building the judge (e.g. to learn its id) loads nothing
    verdicts = asyncio.run(_judge_all(judge, images(5)))
    assert judge.id == f"hf:{tiny_vlm}"
    for verdict in verdicts:
        assert verdict.parse_status in ("ok", "partial", "failed", "refused")
        assert len(verdict.items) == 3 and len(verdict.rationales) == 3
        assert verdict.input_tokens > 0 and verdict.output_tokens > 0
        assert verdict.cost_usd == 0.0  # a local model has no price
        assert verdict.raw  # the generated text, exactly as decoded
        if verdict.parse_status in ("failed", "refused"):
            assert verdict.items == [None, None, None] and verdict.error
    # five concurrent calls: batches of at most three, the first one full
    assert max(judge.batch_sizes) <= 3 and judge.batch_sizes[0] == 3


async def _judge_all(judge, pictures):
    return await asyncio.gather(*(judge.judge(picture, CHECKLIST) for picture in pictures))


def test_prompt_carries_the_image_and_the_checklist(tiny_vlm):
    judge = HFJudge(config(tiny_vlm))
    judge._ensure_loaded()
    processor = judge._processor
    seen: list[dict] = []
    original_call = type(processor).__call__

    def recording_call(self, *args, **kwargs):
        seen.append(kwargs)
        return original_call(self, *args, **kwargs)

    answer_ids = processor.tokenizer("[1, 0, 1]", add_special_tokens=False, return_tensors="pt").input_ids

    def scripted_generate(**inputs):
        # The real inputs went through the real processor; answer with a fixed, readable text.
        assert inputs["pixel_values"].shape[0] == inputs["input_ids"].shape[0]
        return torch.cat([inputs["input_ids"], answer_ids.expand(inputs["input_ids"].shape[0], -1)], dim=1)

    type(processor).__call__ = recording_call
    judge._model.generate = scripted_generate
    try:
        picture = Image.new("RGB", (96, 64), (250, 250, 245))
        verdict = asyncio.run(judge.judge(picture, CHECKLIST))
    finally:
        type(processor).__call__ = original_call
    assert verdict.parse_status == "ok"
    assert verdict.items == [1, 0, 1]
    assert verdict.raw == "[1, 0, 1]"
    (call,) = seen
    (text,) = call["text"]
    assert "<start_of_image>" in text and "Vitiligo" in text and "The patch is white." in text
    ((sent,),) = call["images"]
    assert sent.size == (48, 32)  # downscaled to judge.image_size before the processor
    assert sent.getpixel((10, 10)) == (250, 250, 245)


def test_unreadable_answer_gets_one_batched_repair(tiny_vlm):
    judge = HFJudge(config(tiny_vlm))
    judge._ensure_loaded()
    tokenizer = judge._processor.tokenizer
    replies = iter(["I see skin.", "[0, 1, 1]"])

    def scripted_generate(**inputs):
        ids = tokenizer(next(replies), add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([inputs["input_ids"], ids], dim=1)

    judge._model.generate = scripted_generate
    verdict = asyncio.run(judge.judge(images(1)[0], CHECKLIST))
    assert verdict.parse_status == "ok"
    assert verdict.items == [0, 0, 1]  # the border requires a lesion
    assert verdict.raw == "I see skin.\n\n[repair answer]\n[0, 1, 1]"
    assert judge.batch_sizes == [1, 1]


def test_missing_model_is_a_clear_error(tmp_path):
    judge = HFJudge(config(tmp_path / "no-such-model"))
    with pytest.raises(HFJudgeLoadError, match="judge.model"):
        asyncio.run(judge.judge(images(1)[0], CHECKLIST))


def test_a_failed_generation_is_no_answer_not_a_verdict(tmp_path):
    from magic_align.judges.base import JudgeCallError

    judge = HFJudge(config(tmp_path / "unused"), model=object(), processor=object())

    def out_of_memory(batch):
        raise RuntimeError("CUDA out of memory")

    judge._generate_batch = out_of_memory
    with pytest.raises(JudgeCallError, match="out of memory") as raised:
        asyncio.run(judge.judge(images(1)[0], CHECKLIST))
    assert raised.value.cause == "generation failed (RuntimeError)" and not raised.value.systematic
    with pytest.raises(HFJudgeLoadError) as missing:
        asyncio.run(HFJudge(config(tmp_path / "no-such-model")).judge(images(1)[0], CHECKLIST))
    assert missing.value.systematic  # no call can succeed: the stage stops
