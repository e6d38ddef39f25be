"""Word-level tokenizers for tiny test models and the shipped tiny video LLM.

Built with the ``tokenizers`` library and wrapped as a ``PreTrainedTokenizerFast`` so that the
tiny models load and save exactly like real checkpoints (``save_pretrained``/``from_pretrained``)
and go through the same chat-template code path as LLaVA-OneVision and Qwen2.5-VL.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Special tokens shared by both tiny architectures (names follow the real Qwen2-family tokenizers).
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<unk>"
LLAVA_SPECIAL = ["<image>", "<video>"]
QWEN_VL_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL_TOKENS = [PAD, IM_START, IM_END, UNK, *LLAVA_SPECIAL, *QWEN_VL_SPECIAL]

# A Qwen2-style chat template: the user turn renders a video item as ``video_placeholder``.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}VIDEO_PLACEHOLDER "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    " <|im_end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def chat_template(video_placeholder: str) -> str:
    """The tiny models' chat template, rendering a video item as ``video_placeholder``."""
    return _CHAT_TEMPLATE.replace("VIDEO_PLACEHOLDER", video_placeholder)


BASIC_WORDS = ["user", "assistant", "system", "?", ".", ",", ":", "(", ")", *"ABCDEFGH", *"0123456789"]


def build_word_tokenizer(words: Iterable[str], video_placeholder: str = "<video>") -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over ``words`` plus the special tokens.

    Case is kept so that option letters ``A``-``H`` stay distinct from words.
    Decoding joins tokens with single spaces.
    """
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *BASIC_WORDS, *words]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        additional_special_tokens=[IM_START, *LLAVA_SPECIAL, *QWEN_VL_SPECIAL],
    )
    tok.chat_template = chat_template(video_placeholder)
    tok.padding_side = "left"
    return tok
