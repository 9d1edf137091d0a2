"""Conversation -> token ids and loss mask.

Output per sample (over the FULL token sequence, prompt + response + end-of-turn)::

    input_ids  int32 [n]
    loss_mask  uint8 [n]   1 = token i is a TARGET (predicted from tokens < i), 0 = context

Rules:
- Only trained assistant turns get loss_mask 1 (all assistant turns for the ``messages``
  schema, the response for ``prompt_response``). System, user and context turns, the chat
  template's role headers and the generation prompt (``<|im_start|>assistant\\n``) are 0.
- Every trained turn ends with the END-OF-TURN token, which is trained (mask 1): the chat
  template's terminator (``<|im_end|>`` for Qwen/ChatML, detected as the first special token the
  template puts after the assistant content, or ``model.tokenizer.end_of_turn_token``), or the
  tokenizer's EOS with a plain prompt template. Whatever the template puts after the
  terminator (e.g. ``"\\n"``) is context (0). Padding is added later by the collate, always 0,
  so a pad token equal to EOS is never trained as a terminator.
- Chat templates: the text is split at turn boundaries by rendering prefixes of the
  conversation (``messages[:i]`` with ``add_generation_prompt=True`` and ``messages[:i+1]``);
  each piece is tokenised on its own. A template that rewrites earlier turns (not
  prefix-stable) is reported as a :class:`DataError`.
- Plain templates: ``[BOS] system_template + prompt_template(user) ... response EOS``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from psft_megatron.data.config import TokenizerConfig
from psft_megatron.data.errors import ConfigError, DataError, Location
from psft_megatron.data.conversation import Conversation
from psft_megatron.data.tokenizers import Tokenizer

# a segment: (text or None, fixed ids or None, kind) with kind 0 = context, 1 = trained response
Segment = Tuple[Optional[str], Optional[List[int]], int]
CONTEXT, RESPONSE = 0, 1
# a chat render: (number of leading messages, with the generation prompt)
RenderKey = Tuple[int, bool]
# a conversation's renders, or the error its template raised
Renders = Union[Dict[RenderKey, str], DataError]


def _render_empty(render) -> str:
    try:
        return render([], add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates that index messages[0]
        return ""


class SampleFormatter:
    """Turns :class:`Conversation` objects into ``(input_ids int32 [n], loss_mask uint8 [n])``."""

    def __init__(self, tokenizer: Tokenizer, cfg: TokenizerConfig):
        self.tok = tokenizer
        self.cfg = cfg
        self.use_chat = tokenizer.has_chat_template if cfg.chat_template is None else bool(cfg.chat_template)
        if self.use_chat and not tokenizer.has_chat_template:
            raise ConfigError(
                f"model.tokenizer.chat_template=true but the tokenizer at {cfg.path!r} has no chat template"
            )
        add_bos = cfg.add_bos if cfg.add_bos is not None else tokenizer.library == "sentencepiece"
        self.bos = [tokenizer.bos_id] if (add_bos and not self.use_chat and tokenizer.bos_id is not None) else []
        self.eot_id = self._end_of_turn_id()
        self.stats = {"end_of_turn_appended": 0}
        self._empty: Optional[str] = None  # _empty_render's text, once known

    # ------------------------------------------------------------------ end of turn
    def _end_of_turn_id(self) -> int:
        if self.cfg.end_of_turn_token is not None:
            tid = self.tok.token_to_id(self.cfg.end_of_turn_token)
            if tid is None:
                raise ConfigError(
                    f"model.tokenizer.end_of_turn_token={self.cfg.end_of_turn_token!r} is not in the vocabulary"
                )
            return tid
        if self.use_chat:
            probe = "PSFTPROBE"
            msgs = [{"role": "user", "content": "q"}]
            head = self.tok.render_chat(msgs, add_generation_prompt=True)
            full = self.tok.render_chat(msgs + [{"role": "assistant", "content": probe}])
            at = full.find(probe, len(head) if full.startswith(head) else 0)
            if at >= 0:
                special = self.tok.special_ids
                for tid in self.tok.encode(full[at + len(probe):]):
                    if tid in special:
                        return tid
        if self.tok.eos_id is None:
            raise ConfigError(
                "model.tokenizer: cannot determine the end-of-turn token (no chat-template terminator, no EOS); "
                "set model.tokenizer.end_of_turn_token"
            )
        return self.tok.eos_id

    # ------------------------------------------------------------------ chat rendering
    @staticmethod
    def _renders_needed(conv: Conversation) -> List[RenderKey]:
        """The prefixes of ``conv`` that :meth:`_chat_segments` reads: ``(k, generation prompt)``
        = ``render(messages[:k], add_generation_prompt)``."""
        keys: List[RenderKey] = []
        for i, trained in enumerate(conv.trained):
            if trained:
                keys += [(i, True), (i + 1, False)] if i > 0 else [(i + 1, False)]
        if not conv.trained[-1]:
            keys.append((len(conv.messages), False))
        return keys

    def _empty_render(self) -> str:
        """The template's render of no messages with the generation prompt ("" if it fails), once."""
        if self._empty is None:
            self._empty = _render_empty(self.tok.render_chat)
        return self._empty

    def _render_one(self, messages: List[dict], generation: bool, loc: Location) -> str:
        try:
            return self.tok.render_chat(messages, add_generation_prompt=generation)
        except Exception as exc:  # noqa: BLE001 - the template's raise_exception, a missing key...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"the chat template fails on this record: {first}", loc) from None

    def render_batch(self, convs: Sequence[Conversation], locs: Sequence[Location]) -> List[Renders]:
        """Every prefix that :meth:`_renders_needed` lists, for many conversations: one batched
        template call per generation-prompt setting. If the template fails, the conversations
        are rendered one by one and a failing one gets its :class:`DataError` in place of its
        renders (raised by :meth:`segments`, so the first bad record in order is the one reported)."""
        out: List[Renders] = [{} for _ in convs]
        try:
            for generation in (False, True):
                wanted = [(c, k) for c, conv in enumerate(convs) for k, g in self._renders_needed(conv) if g == generation]
                batch = [convs[c].messages[:k] for c, k in wanted]
                texts = self.tok.render_chats(batch, add_generation_prompt=generation) if batch else []
                for (c, k), text in zip(wanted, texts):
                    out[c][(k, generation)] = text
        except Exception:  # noqa: BLE001 - find the records
            out = [self._render_each(conv, loc) for conv, loc in zip(convs, locs)]
        return out

    def _render_each(self, conv: Conversation, loc: Location) -> Renders:
        try:
            return {(k, g): self._render_one(conv.messages[:k], g, loc) for k, g in self._renders_needed(conv)}
        except DataError as exc:
            return exc

    # ------------------------------------------------------------------ segments
    def _chat_segments(self, conv: Conversation, loc: Location, rendered: Renders) -> List[Segment]:
        if isinstance(rendered, DataError):
            raise rendered
        segs: List[Segment] = []
        done = ""  # text already assigned to segments
        msgs = conv.messages
        for i, trained in enumerate(conv.trained):
            if not trained:
                continue
            upto = rendered[(i + 1, False)]
            if i > 0:
                head = rendered[(i, True)]
            else:  # a conversation that opens with an assistant turn: its header is context too
                head = self._empty_render()
                at = upto.rfind(msgs[0]["content"])
                if at > len(head):
                    head = upto[:at]
            if not head.startswith(done) or not upto.startswith(head):
                raise DataError(
                    f"the chat template is not prefix-stable at message {i} (it rewrites earlier turns), "
                    "so the assistant turns cannot be located; use a prefix-stable template", loc)
            if len(head) > len(done):
                segs.append((head[len(done):], None, CONTEXT))
            segs.append((upto[len(head):], None, RESPONSE))
            done = upto
        if not conv.trained[-1]:
            full = rendered[(len(msgs), False)]
            if not full.startswith(done):
                raise DataError("the chat template is not prefix-stable (it rewrites earlier turns)", loc)
            segs.append((full[len(done):], None, CONTEXT))
        return segs

    def _plain_segments(self, conv: Conversation) -> List[Segment]:
        segs: List[Segment] = []
        if self.bos:
            segs.append((None, list(self.bos), CONTEXT))
        pending = ""
        for msg, trained in zip(conv.messages, conv.trained):
            role, content = msg["role"], msg["content"]
            if trained:
                if pending:
                    segs.append((pending, None, CONTEXT))
                    pending = ""
                segs.append((content, None, RESPONSE))
                segs.append((None, [self.eot_id], RESPONSE))
            elif role == "system":
                pending += self.cfg.system_template.format(system=content)
            elif role == "user":
                pending += self.cfg.prompt_template.format(prompt=content)
            else:  # an untrained assistant turn (context inside a prompt)
                if pending:
                    segs.append((pending, None, CONTEXT))
                    pending = ""
                segs.append((content, None, CONTEXT))
                segs.append((None, [self.eot_id], CONTEXT))
        if pending:
            segs.append((pending, None, CONTEXT))
        return segs

    def segments(self, conv: Conversation, loc: Location,
                 rendered: Optional[Renders] = None) -> List[Segment]:
        """The pieces of one sample; ``rendered``: its chat renders from :meth:`render_batch`
        (None: rendered here)."""
        if not self.use_chat:
            return self._plain_segments(conv)
        return self._chat_segments(conv, loc, rendered if rendered is not None else self.render_batch([conv], [loc])[0])

    # ------------------------------------------------------------------ ids + mask
    def _assemble(self, segs: Sequence[Segment], encoded: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
        ids: List[int] = []
        mask: List[int] = []
        texts = iter(encoded)
        for text, fixed, kind in segs:
            part = fixed if fixed is not None else next(texts)
            if kind == RESPONSE and fixed is None and self.use_chat:
                # train through the first end-of-turn token; what follows it is context
                try:
                    cut = part.index(self.eot_id) + 1
                except ValueError:
                    part = list(part) + [self.eot_id]
                    cut = len(part)
                    self.stats["end_of_turn_appended"] += 1
                ids += part
                mask += [1] * cut
                mask += [0] * (len(part) - cut)
            else:
                ids += part
                mask += [kind] * len(part)
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)

    def __call__(self, conv: Conversation, loc: Location) -> Tuple[np.ndarray, np.ndarray]:
        """One sample -> (input_ids int32 [n], loss_mask uint8 [n])."""
        return self.format_batch([conv], [loc])[0]

    def format_batch(self, convs: Sequence[Conversation], locs: Sequence[Location]):
        """Many samples at once (one batched tokenizer call); list of (ids, mask)."""
        renders = self.render_batch(convs, locs) if self.use_chat else [None] * len(convs)
        all_segs = [self.segments(c, l, r) for c, l, r in zip(convs, locs, renders)]
        texts = [t for segs in all_segs for t, fixed, _ in segs if fixed is None]
        enc_batch = getattr(self.tok, "encode_batch", None)
        encoded = enc_batch(texts) if (enc_batch and texts) else [self.tok.encode(t) for t in texts]
        out, pos = [], 0
        for segs in all_segs:
            n = sum(1 for t, fixed, _ in segs if fixed is None)
            out.append(self._assemble(segs, encoded[pos : pos + n]))
            pos += n
        return out
