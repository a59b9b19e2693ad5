"""Hugging Face ``tokenizer.json`` checkpoints as torchtune model tokenizers.

torchtune 0.6.1 ships :class:`~torchtune.modules.transforms.tokenizers.HuggingFaceBaseTokenizer`
(plain ``encode``/``decode``) but no *model* tokenizer that turns conversations into tokens and
loss masks for a ``tokenizer.json`` model such as SmolLM2. :class:`HFModelTokenizer` fills that
gap for chat models (SmolLM2-Instruct, Qwen2.5-Instruct, DeepSeek-R1-Distill-Qwen, ...), and is
a valid ``tokenizer`` for ``text_completion_dataset``, ``chat_dataset`` and ``padded_collate_sft``::

    tokenizer:
      _component_: adapt_prune_tune.tokenizer.smollm2_tokenizer
      path: ~/.cache/adapt-prune-tune/models/SmolLM2-135M-Instruct
      max_seq_len: 2048

Whether a chat template is ChatML is decided by rendering it, not by guessing from its text,
so templates that add a default system prompt (SmolLM2, Qwen2.5) are handled exactly like
``transformers``' ``apply_chat_template`` handles them. Any other template is rendered as a
whole and its tokens are attributed to messages by character offsets (:func:`message_spans`).
"""

import bisect
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from torchtune.data import Message, PromptTemplateInterface, truncate
from torchtune.data._prompt_templates import _get_prompt_template, _TemplateType
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_CHAT_ROLES = ("system", "user", "assistant")
_PROBE = {role: f"PROBE-{role.upper()}-TEXT" for role in _CHAT_ROLES}
_SYSTEM_TURN = re.compile(
    re.escape(f"{IM_START}system\n") + "(.*)" + re.escape(f"{IM_END}\n"), re.DOTALL
)


class ChatMLFormat(NamedTuple):
    """What a ChatML chat template does beyond plain ChatML turns.

    Attributes:
        default_system_prompt (Optional[str]): the system turn the template inserts when a
            conversation does not start with one (SmolLM2 and Qwen2.5 both do), or None.
    """

    default_system_prompt: Optional[str]


def chatml_turn(role: str, content: str) -> str:
    """One ChatML turn, exactly as ChatML chat templates write it."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def render_chat_template(
    chat_template: str,
    messages: List[Dict[str, str]],
    add_generation_prompt: bool,
    **special_tokens: Optional[str],
) -> str:
    """Render a Hugging Face chat template the way ``transformers`` does (sandboxed Jinja,
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``strftime_now``, the special tokens as
    variables: templates such as DeepSeek-R1's write ``{{ bos_token }}`` themselves)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = _strftime_now  # Llama 3.2's template dates its system turn
    return environment.from_string(chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
    )


def message_spans(
    chat_template: str,
    messages: List[Dict[str, str]],
    generation: bool,
    **special_tokens: Optional[str],
) -> Tuple[str, List[int]]:
    """The rendered conversation and the character offsets that split it among messages.

    Message ``i`` owns what rendering ``messages[:i+1]`` adds to rendering ``messages[:i]``,
    i.e. ``text[bounds[i]:bounds[i+1]]``; ``text[:bounds[0]]`` is what the template writes
    before any message (a BOS, say). With ``generation`` a last assistant message (the turn
    being written) follows the template's generation prompt instead of being a closed turn.

    Raises:
        NotImplementedError: if a shorter conversation does not render as a prefix of a
            longer one (a template that rewrites earlier turns), which leaves messages without
            well-defined text.
    """

    def render(count: int, prompt: bool = False) -> str:
        return render_chat_template(chat_template, messages[:count], prompt, **special_tokens)

    try:
        previous = render(0)
    except Exception:  # noqa: BLE001 - a template may index messages[0]: then there is no preamble
        previous = ""
    bounds: List[int] = []
    for count in range(1, len(messages) + 1):
        if generation and count == len(messages) and messages[-1]["role"] == "assistant":
            text = render(count - 1, True) + messages[-1]["content"]
        else:
            text = render(count)
        if count == 1 and not text.startswith(previous):
            previous = ""  # what the empty conversation rendered is not a preamble the others share
        if not text.startswith(previous):
            raise NotImplementedError(
                f"the chat template re-renders earlier turns when message {count} is added, so its "
                "tokens cannot be attributed to messages; tokenize this model's conversations with its "
                "own torchtune tokenizer"
            )
        bounds.append(len(previous))
        previous = text
    return previous, bounds + [len(previous)]


def detect_chatml(chat_template: Optional[str]) -> Optional[ChatMLFormat]:
    """Decide by rendering probe conversations whether ``chat_template`` is ChatML.

    The template is ChatML if (1) a lone user message renders as its ChatML turn, preceded
    by nothing or by one ChatML system turn (the template's default system prompt); (2) an
    explicit system, user and assistant message render as their three ChatML turns; and
    (3) the generation prompt is ``<|im_start|>assistant\\n``.

    Returns:
        Optional[ChatMLFormat]: None if there is no template, it is not ChatML, or it cannot
        be rendered.
    """
    if not isinstance(chat_template, str):
        return None
    user = {"role": "user", "content": _PROBE["user"]}
    conversation = [{"role": role, "content": _PROBE[role]} for role in _CHAT_ROLES]
    try:
        lone_user = render_chat_template(chat_template, [user], False)
        full = render_chat_template(chat_template, conversation, False)
        prompt = render_chat_template(chat_template, [user], True)
    except Exception:  # any template that fails on plain messages is not usable as ChatML
        return None

    user_turn = chatml_turn("user", _PROBE["user"])
    if not lone_user.endswith(user_turn):
        return None
    prefix = lone_user[: -len(user_turn)]
    system_turn = _SYSTEM_TURN.fullmatch(prefix)
    if prefix and system_turn is None:
        return None
    if full != "".join(chatml_turn(m["role"], m["content"]) for m in conversation):
        return None
    if prompt != lone_user + f"{IM_START}assistant\n":
        return None
    return ChatMLFormat(default_system_prompt=system_turn.group(1) if system_turn else None)


def _read_json(path: Optional[str]) -> Dict[str, Any]:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> Optional[str]:
    """A special token as ``tokenizer_config.json`` gives it: a string, an ``AddedToken`` dict
    (``{"content": ...}``) or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_id_list(value: Any) -> List[int]:
    """``generation_config.json`` gives ``eos_token_id`` as an int, a list of ints or null."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class HFModelTokenizer(ModelTokenizer, Transform):
    """A torchtune model tokenizer for a Hugging Face ``tokenizer.json`` checkpoint.

    Special tokens come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
    ``pad_token``) with ``generation_config.json`` as fallback; ``pad_id`` falls back to
    ``eos_id``, because ``padded_collate_sft`` needs one and padded positions never enter the
    loss.

    BOS: ``encode(text, add_bos=True)`` adds what the model's own tokenizer adds, i.e. runs the
    ``tokenizer.json`` post-processor, instead of unconditionally prepending ``bos_id`` as
    ``HuggingFaceBaseTokenizer`` does. SmolLM2 and Qwen2.5 add nothing: SmolLM2's
    ``bos_token`` is ``<|im_start|>``, the ChatML turn opener, and putting it before plain
    text would announce a chat turn that never comes. This keeps token ids identical to
    ``transformers`` (and lm-eval), so perplexities agree. Models whose post-processor adds a
    BOS (Llama 3) get it.

    Chat: :meth:`tokenize_messages` produces the tokens of the checkpoint's ``chat_template``
    exactly as ``apply_chat_template(..., tokenize=True)`` does. ChatML templates are built
    turn by turn, including the default system prompt that SmolLM2's and Qwen2.5's templates
    insert when a conversation has no system message (the model was fine-tuned and is served
    with it; that inserted turn is always masked; a leading system message replaces it). Any
    other template (DeepSeek-R1's, Llama 3's) is rendered whole with the special tokens as
    variables, tokenized once, and each token takes the mask of the message whose text it
    starts in (:func:`message_spans`); the template's preamble is masked. A checkpoint without
    a template makes :meth:`tokenize_messages` raise NotImplementedError.

    Args:
        tokenizer_json_path (str): path to ``tokenizer.json``.
        tokenizer_config_json_path (Optional[str]): path to ``tokenizer_config.json``, which
            names the special tokens and holds the chat template. Default None.
        generation_config_json_path (Optional[str]): path to ``generation_config.json``, for
            token ids the tokenizer config lacks and for extra stop tokens. Default None.
        chat_template_path (Optional[str]): a ``chat_template.jinja`` file (transformers 5
            saves the template there); it takes precedence over the tokenizer config's.
            Default None.
        max_seq_len (Optional[int]): truncate chat samples (and, through the datasets, text
            samples) to this many tokens. Default None.
        prompt_template (Optional[PromptTemplateInterface]): applied to messages before they
            are tokenized, as in torchtune's model tokenizers. Default None.

    Raises:
        ValueError: if no EOS token can be found in either config.
    """

    def __init__(
        self,
        tokenizer_json_path: str,
        *,
        tokenizer_config_json_path: Optional[str] = None,
        generation_config_json_path: Optional[str] = None,
        chat_template_path: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        prompt_template: Optional[PromptTemplateInterface] = None,
    ):
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
        self.name = Path(tokenizer_json_path).parent.name
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template

        config = _read_json(tokenizer_config_json_path)
        generation_config = _read_json(generation_config_json_path)
        self.bos_id = self._special_id(config, "bos_token", generation_config)
        self.eos_id = self._special_id(config, "eos_token", generation_config)
        if self.eos_id is None:
            raise ValueError(
                f"{self.name}: no EOS token in tokenizer_config.json or generation_config.json"
            )
        pad_id = self._special_id(config, "pad_token", generation_config)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.stop_tokens = sorted(
            {self.eos_id, *_as_id_list(generation_config.get("eos_token_id"))}
        )
        self.special_tokens = {
            token.content: token_id
            for token_id, token in self._tokenizer.get_added_tokens_decoder().items()
            if token.special
        }

        chat_template = config.get("chat_template")
        if chat_template_path is not None:
            chat_template = Path(chat_template_path).read_text(encoding="utf-8")
        self._chat_template: Optional[str] = chat_template if isinstance(chat_template, str) else None
        self._chatml = detect_chatml(self._chat_template)
        self._template_tokens = {
            key: _token_content(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self._im_start_id = self._tokenizer.token_to_id(IM_START)
        self._im_end_id = self._tokenizer.token_to_id(IM_END)

    def _special_id(
        self, config: Dict[str, Any], key: str, generation_config: Dict[str, Any]
    ) -> Optional[int]:
        """Id of special token ``key`` (e.g. ``"eos_token"``): the token the tokenizer config
        names, else the first ``<key>_id`` of the generation config."""
        token = _token_content(config.get(key))
        if token is not None:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{self.name}: {key} {token!r} is not in the vocabulary")
            return token_id
        ids = _as_id_list(generation_config.get(f"{key}_id"))
        return ids[0] if ids else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def default_system_prompt(self) -> Optional[str]:
        """The system prompt the chat template inserts when a conversation has none."""
        return self._chatml.default_system_prompt if self._chatml else None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Encode text into token ids.

        Args:
            text (str): the text to encode. Special-token strings in it (``<|im_end|>``) are
                encoded as the special tokens, as ``transformers`` does.
            add_bos (bool): add the special tokens the model's tokenizer adds around text
                (its post-processor; nothing for SmolLM2 and Qwen2.5). Default True.
            add_eos (bool): append ``eos_id``. Default True.

        Returns:
            List[int]: the token ids.
        """
        token_ids = self._tokenizer.encode(text, add_special_tokens=add_bos).ids
        if add_eos:
            token_ids.append(self.eos_id)
        return token_ids

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """Decode token ids into text.

        Args:
            token_ids (List[int]): the token ids.
            skip_special_tokens (bool): leave special tokens out of the text. Default True.

        Returns:
            str: the decoded text.
        """
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def _tokenize_turn(self, role: str, content: str, close: bool) -> List[int]:
        """Token ids of one ChatML turn; without its closing ``<|im_end|>\\n`` if not ``close``.

        Role header and content are encoded as one piece, as they are when the rendered
        template is tokenized in one go: encoded separately, whitespace at the start of the
        content would merge differently with the header's newline.
        """
        tokens = [self._im_start_id, *self.encode(f"{role}\n{content}", False, False)]
        if close:
            tokens += [self._im_end_id, *self.encode("\n", False, False)]
        return tokens

    def _check_chat_support(self, messages: List[Message]) -> None:
        if self._chat_template is None:
            raise NotImplementedError(
                f"{self.name} has no chat template (tokenizer_config.json `chat_template` or "
                "chat_template.jinja), so conversations have no defined tokens. Use text completion "
                "data, a prompt_template, or the model's own torchtune tokenizer."
            )
        for message in messages:
            if message.role not in _CHAT_ROLES:
                raise NotImplementedError(
                    f"{self.name}: {message.role!r} messages are not supported; "
                    f"roles: {', '.join(_CHAT_ROLES)}"
                )
            if message.contains_media:
                raise RuntimeError(f"{self.name}: only text content can be tokenized")

    def tokenize_messages(
        self, messages: List[Message], *, add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """Tokenize a conversation into its chat template's token ids and a loss mask.

        Each message's tokens, ChatML header and closing ``<|im_end|>\n`` included, take its
        ``masked`` flag (True: left out of the loss), as in torchtune's Llama 3 and Qwen2
        tokenizers; with torchtune's datasets the model thus learns the assistant turns and
        when to end them. The template's default system turn is masked.

        Args:
            messages (List[Message]): the conversation.
            add_end_tokens (bool): close the last turn with ``<|im_end|>\\n``. False for
                generation: ``[user, Message("assistant", "")]`` then ends in the generation
                prompt ``<|im_start|>assistant\\n``. Default True.

        Returns:
            Tuple[List[int], List[bool]]: token ids and mask, truncated to ``max_seq_len``
            (the last token then becomes ``eos_id``, masked, if ``add_end_tokens``).

        Raises:
            NotImplementedError: if the checkpoint has no chat template, or for roles other than
                system, user and assistant.
        """
        self._check_chat_support(messages)
        if self.prompt_template is not None:
            messages = self.prompt_template(messages)
        if self._chatml is None:
            tokens, mask = self._tokenize_rendered(messages, add_end_tokens)
        else:
            tokens, mask = self._tokenize_chatml(messages, add_end_tokens)
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def _tokenize_chatml(self, messages: List[Message], add_end_tokens: bool) -> Tuple[List[int], List[bool]]:
        """ChatML turn by turn (see :meth:`tokenize_messages`)."""
        tokens: List[int] = []
        mask: List[bool] = []
        if messages and messages[0].role != "system" and self.default_system_prompt:
            tokens = self._tokenize_turn("system", self.default_system_prompt, close=True)
            mask = [True] * len(tokens)
        for index, message in enumerate(messages):
            close = add_end_tokens or index < len(messages) - 1
            turn = self._tokenize_turn(message.role, message.text_content, close)
            tokens += turn
            mask += [message.masked] * len(turn)
        return tokens, mask

    def _tokenize_rendered(self, messages: List[Message], add_end_tokens: bool) -> Tuple[List[int], List[bool]]:
        """Any other template: render whole, tokenize once, mask each token by the message its
        text starts in. One tokenization of the whole text keeps the ids identical to
        ``apply_chat_template`` even where a template joins turns without a special token."""
        dicts = [{"role": m.role, "content": m.text_content} for m in messages]
        try:
            text, bounds = message_spans(self._chat_template, dicts, not add_end_tokens, **self._template_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.name}: the chat template refused this conversation: {e}") from e
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        mask = []
        for start, _ in encoding.offsets:
            owner = bisect.bisect_right(bounds, start) - 1  # -1: the preamble; len(messages): past the last
            mask.append(messages[owner].masked if 0 <= owner < len(messages) else True)
        return list(encoding.ids), mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace the sample's ``messages`` by ``tokens`` and ``mask`` (a torchtune dataset
        model transform).

        Args:
            sample (Mapping[str, Any]): a sample with a ``messages`` field (List[Message]).
            inference (bool): leave the last turn open for generation. Default False.

        Returns:
            Mapping[str, Any]: the sample with ``tokens`` and ``mask`` and without
            ``messages``.
        """
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def _optional_file(directory: Path, name: str) -> Optional[str]:
    path = directory / name
    return str(path) if path.is_file() else None


def hf_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    prompt_template: Optional[_TemplateType] = None,
) -> HFModelTokenizer:
    """Build an :class:`HFModelTokenizer` from a Hugging Face checkpoint directory.

    Args:
        path (str): the checkpoint directory; ``tokenizer.json`` must be in it, and
            ``tokenizer_config.json``, ``generation_config.json`` and ``chat_template.jinja``
            are used if present.
        max_seq_len (Optional[int]): maximum sequence length. Default None.
        prompt_template (Optional[_TemplateType]): a torchtune prompt template: dotpath of a
            template class or a dict of role to (prepend, append) tags. Default None.

    Returns:
        HFModelTokenizer: the tokenizer.

    Raises:
        FileNotFoundError: if ``path`` has no ``tokenizer.json``.
    """
    directory = Path(path)
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"No tokenizer.json in {directory}: hf_tokenizer needs a Hugging Face checkpoint "
            "directory with a fast-tokenizer file"
        )
    return HFModelTokenizer(
        str(tokenizer_json),
        tokenizer_config_json_path=_optional_file(directory, "tokenizer_config.json"),
        generation_config_json_path=_optional_file(directory, "generation_config.json"),
        chat_template_path=_optional_file(directory, "chat_template.jinja"),
        max_seq_len=max_seq_len,
        prompt_template=(
            _get_prompt_template(prompt_template) if prompt_template is not None else None
        ),
    )


def smollm2_tokenizer(
    path: str,
    max_seq_len: Optional[int] = None,
    prompt_template: Optional[_TemplateType] = None,
) -> HFModelTokenizer:
    """The SmolLM2 tokenizer from a checkpoint directory, e.g. the one
    :func:`adapt_prune_tune.assets.prepare_smollm2` writes.

    SmolLM2 needs nothing beyond :func:`hf_tokenizer`; this builder exists so that configs
    name the model they tokenize for, as torchtune's own builders do.

    Args:
        path (str): the checkpoint directory.
        max_seq_len (Optional[int]): maximum sequence length. Default None.
        prompt_template (Optional[_TemplateType]): a torchtune prompt template. Default None.

    Returns:
        HFModelTokenizer: the tokenizer.
    """
    return hf_tokenizer(path, max_seq_len=max_seq_len, prompt_template=prompt_template)
