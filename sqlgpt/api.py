"""The Python API for apps: load a trained model from its database and use it.

    m = sqlgpt.load("model.db")
    m.generate("the king", max_tokens=30, temperature=0.8, top_k=40, seed=1)
"""
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classify.predict import encode_texts, probabilities
from . import store
from .chat.conversation import ChatFormat
from .chat.data import SCORED, START, ChatTokens, fitted, read_conversations
from .chat.template import DEFAULT_TEMPLATE
from .store.rows import _check_values
from .data.corpus import find_sources
from .data.dataset import write_tokens
from .errors import SqlgptError
from .train.evaluate import evaluate, evaluate_chat
from .inference.decoder import Decoder, check_precision
from .inference.sampling import Sampler
from .inference.beam import beam_search
from .inference.generate import DRAFT_TOKENS, MAX_BATCH, generate_batch, speculative_ids
from .model.lora import merged
from .model.quant import BITS, DEFAULT_GROUP, check_group, quantized_copy
from .model.quant import matrices as quant_matrices


@dataclass
class Completion:
    """One sequence of a batch: its prompt, the text (the prompt's, then the
    generated), how many tokens were generated, and the batch's seconds."""
    prompt: str
    text: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self):
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Beam:
    """One continuation found by beam search."""
    text: str          # the text it adds after the prompt
    ids: list          # its token ids (the end token not included)
    logprob: float     # their summed natural-log probability (and the end token's)
    score: float       # logprob / tokens ** length_penalty: what the search ranks by
    finished: bool     # it ended at the end token, not at max_tokens


class TextStream:
    """Ids to text as they come: the prompt's text, then what each token
    adds, holding back a token that ends inside a UTF-8 character and text
    that may begin a stop string; ends before the first stop string. Each
    token costs O(1) (the tokenizer's stream decoder; stop strings are
    looked for only where the new text can complete one)."""

    def __init__(self, tokenizer, prompt_ids, stop=()):
        if isinstance(stop, str):
            stop = (stop,)
        if any(not isinstance(s, str) or not s for s in stop):
            raise SqlgptError("a stop string must be non-empty text")
        self.stop, self.stopped = tuple(stop), False
        self._longest = max(map(len, self.stop), default=0)
        self.prompt_text = tokenizer.decode(prompt_ids)
        self._decoder = tokenizer.stream(prompt_ids)
        self._generated = []   # pieces decoded after the prompt
        self._decoded = 0      # their total length
        self._shown = 0        # how much of it is shown
        self._tail = ""        # the generated text not shown, and what may precede a stop

    @property
    def shown(self):
        """The text shown so far, the prompt's included."""
        return self.prompt_text + "".join(self._generated)[:self._shown]

    def push(self, token):
        """The text token adds that is safe to show now ('' if none)."""
        piece = self._decoder.push(token)
        if not self.stop:  # nothing to hold back: all of it shows now
            self._generated.append(piece)
            self._decoded += len(piece)
            self._shown = self._decoded
            return piece
        return self._advance(piece, final=False)

    def pieces(self, tokens, stats=None):
        """Yield the text each of tokens adds as it comes (see push), then
        what is left, ending at a stop string; stats counts the tokens."""
        for token in tokens:
            if stats is not None:
                stats.tokens += 1
            piece = self.push(token)
            if piece:
                yield piece
            if self.stopped:
                return
        piece = self.finish()
        if piece:
            yield piece

    def finish(self):
        """What is left to show once generation ends."""
        return self._advance(self._decoder.finish(), final=True)

    def _advance(self, piece, final):
        if self.stopped:
            return ""
        self._generated.append(piece)
        self._decoded += len(piece)
        # the unshown text, after as much shown text as a stop string could
        # begin in (one that ends before it would have stopped already)
        unshown = self._decoded - self._shown
        window = unshown + max(self._longest - 1, 0)
        tail = (self._tail + piece)[-window:] if window else ""
        self._tail = tail
        before = len(tail) - unshown  # tail[before:] is the unshown text
        cuts = [tail.find(s) for s in self.stop if s in tail]
        if cuts:
            show, self.stopped = max(0, min(cuts) - before), True
        elif final:
            show = unshown
        else:
            show = max(0, unshown - self._held(tail))
        text = tail[before:before + show]
        self._shown += show
        return text

    def _held(self, generated):
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(generated)), 0, -1)
                    if generated.endswith(s[:n])), default=0)


class Model:
    """A trained model: config, tokenizer and weights of the latest checkpoint.
    precision (contract.PRECISIONS) is the weights' format while generating."""

    def __init__(self, gpt, train_cfg, tokenizer, step, precision="fp32", corpus=None,
                 quantized=None, chat_template=None):
        check_precision(precision)
        self.chat_template = chat_template  # the model's own; None: sqlgpt's default
        self.chat_tuned = chat_template is not None  # answers through a chat template
        self.context = gpt.arch.seq_len  # a prompt and its reply together, at most (serve --ctx)
        self._chat_formats = {}
        self._model, self.tokenizer, self.step = gpt, tokenizer, step
        self._later = None  # a store.LaterRead while the weights are still unread
        # int8 / int4: (group size, {matrix name: (q, scales)}) as stored
        self._quantized = quantized or (0, None)
        # what the model was trained on: {files: [{path, bytes}], sha256, tokens}
        self.corpus = corpus or {}
        self.train_config = train_cfg
        self.precision = precision
        self._decoder = None  # made on first use: packing the weights is a model-sized copy
        self.labels = []  # a classifier's label names, by the head's output id

    @property
    def _gpt(self):
        """The GPT with its weights (float32), read on first use."""
        if self._later is not None:
            self._later.into(self._model)
            self._later = None
        return self._model

    def read_weights(self):
        """Read (and so check) the weights now, where load() left them for
        their first use."""
        return self._gpt

    @property
    def config(self):
        """Architecture and training settings, as stored (one flat dict)."""
        return {**self.train_config.to_dict(), **self._model.arch.to_dict()}

    @property
    def arch(self):
        return self._model.arch

    @property
    def lora(self):
        """A fine-tune's LoraConfig (its adapters and base), or None."""
        return self._model.lora

    def state_dict(self):
        """{name: float32 array} of every stored tensor, under the tensor
        table's names (copies; a tied head is wte; a fine-tune's adapters
        folded into its base's matrices)."""
        return {name: data.copy() for name, data in merged(self._gpt).items()}

    def state_dict_view(self):
        """{name: the model's own float32 array} (no copies: do not modify;
        a fine-tune's merged matrices are new arrays)."""
        return merged(self._gpt)

    def num_parameters(self):
        """The model's parameters (a fine-tune's base's: its adapters are
        folded in)."""
        return self._model.base.size

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def logits(self, ids):
        """Eval-mode logits (len, n_vocab) for a 1-D sequence of ids."""
        ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        self._gpt.forward(ids)
        return self._gpt.acts.logits[: ids.shape[1]].copy()

    def prompt_ids(self, prompt):
        """Prompt -> ids (the last seq_len of them). An empty prompt starts a
        new document: after <eos> where the tokenizer has one, else from the
        most frequent word."""
        tok = self.tokenizer
        if not prompt:
            return np.array([tok.eos_id if tok.eos_id is not None else 1], dtype=np.int32)
        ids = self.encode(prompt)
        if len(ids) == 0:
            raise SqlgptError("the prompt has no words" if tok.kind == "word"
                              else "the prompt has no tokens")
        if tok.unk_id is not None and (ids == tok.unk_id).all():
            raise SqlgptError(f"none of the prompt's tokens are in the vocabulary: {prompt!r}")
        return ids[-self.arch.seq_len:]

    def _banned(self, allow_unk):
        """Ids never sampled: <pad>, <bos>, and <unk> unless allowed."""
        tok = self.tokenizer
        banned = {tok.pad_id, tok.bos_id} | (set() if allow_unk else {tok.unk_id})
        # an imported tokenizer may give <eos>'s id to bos or pad too (GPT-2's
        # <|endoftext|> is all three): the end stays reachable
        return tuple(sorted(i for i in banned if i is not None and i != tok.eos_id))

    def decoder(self, slots=1):
        """A Decoder with KV caches of its own for `slots` sequences, on the
        model's weights as packed once (on first use). A plain model whose
        weights are still unread is packed from the file tensor by tensor:
        generating never holds the float32 weights beside the decoder's."""
        if self._decoder is None:
            group, blocks = self._quantized
            if self._later is None or self.lora is not None:
                self._decoder = Decoder(self._gpt, self.precision, 1, blocks, group)
            else:
                with self._later.snapshot() as conn:
                    self._decoder = Decoder(self._model, self.precision, 1, blocks, group,
                                            store.StoredTensors(conn, self.arch))
            self._quantized = (group, None)  # the decoder holds them now, in its layout
        return self._decoder.fork(slots)

    def check_draft(self, draft):
        """A draft model must share this model's tokenizer exactly."""
        if not isinstance(draft, Model):
            raise SqlgptError("the draft must be a sqlgpt Model (sqlgpt.load)")
        mine, theirs = self.tokenizer, draft.tokenizer
        if (mine.kind, mine.vocab_rows(), mine.state()) != \
                (theirs.kind, theirs.vocab_rows(), theirs.state()):
            raise SqlgptError(f"the draft model's tokenizer ({theirs.kind}, {theirs.n_ids} ids) "
                              f"is not this model's ({mine.kind}, {mine.n_ids} ids): a draft "
                              f"must be trained with the same tokenizer")

    def generate_ids(self, prompt="", max_tokens=50, temperature=1.0, top_k=0, top_p=1.0,
                     seed=None, allow_unk=False, min_p=0.0, repetition_penalty=1.0, draft=None,
                     draft_tokens=DRAFT_TOKENS, stats=None):
        """Yield generated ids one at a time (for streaming), ending early at
        <eos> (which is not yielded). <pad> and <bos> are never sampled, and
        <unk> only with allow_unk. With draft (a smaller Model with the same
        tokenizer), speculative decoding: the same distribution (greedy: the
        same tokens), fewer passes over this model's weights. stats: a
        GenerationStats to count the tokens (and the draft's proposals) in."""
        sampler = Sampler(temperature, top_k, top_p, min_p, repetition_penalty)
        prompt_ids = self.prompt_ids(prompt)
        eos, banned = self.tokenizer.eos_id, self._banned(allow_unk)
        if draft is not None:
            self.check_draft(draft)
            yield from speculative_ids(self.decoder(), draft.decoder(), prompt_ids, max_tokens,
                                       sampler, seed, banned, eos, draft_tokens, stats)
            return
        for _, token in generate_batch(self.decoder(), [prompt_ids], max_tokens, sampler, seed,
                                       banned, eos):
            if stats is not None:
                stats.tokens += 1
            yield token

    def stream(self, prompt="", max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, seed=None,
               allow_unk=False, stop=(), **options):
        """Yield the generated text in pieces as tokens come: the prompt's
        text first, then what each token adds. A token that ends inside a
        UTF-8 character (byte and BPE pieces can) is held back until the
        character is whole, and text that may begin a stop string until it
        is known not to. Generation ends before the first stop string.
        options: min_p, repetition_penalty, draft, draft_tokens, stats (see
        generate_ids)."""
        text = TextStream(self.tokenizer, self.prompt_ids(prompt), stop)
        yield text.shown
        yield from text.pieces(self.generate_ids(prompt, max_tokens, temperature, top_k, top_p,
                                                 seed, allow_unk, **options))

    def generate(self, prompt="", max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                 allow_unk=False, stop=(), **options):
        """The prompt followed by up to max_tokens generated tokens, as text
        (ending before a stop string). A list of prompts is one batch: a list
        of texts, sequence i sampled with seed + i (what it gives alone with
        that seed). options: min_p, repetition_penalty, and for one prompt
        draft, draft_tokens, stats (speculative decoding)."""
        if isinstance(prompt, (list, tuple)):
            if set(options) & {"draft", "draft_tokens"}:
                raise SqlgptError("speculative decoding (draft) takes one prompt at a time")
            return [c.text for c in self.complete(prompt, max_tokens, temperature, top_k, top_p,
                                                  seed, allow_unk, stop, **options)]
        return "".join(self.stream(prompt, max_tokens, temperature, top_k, top_p, seed,
                                   allow_unk, stop, **options))

    def complete(self, prompts, max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                 allow_unk=False, stop=(), min_p=0.0, repetition_penalty=1.0, stats=None):
        """Generate after every prompt at once, in batched decode steps (each
        weight read once per step for all of them): a Completion for each,
        sequence i sampled with seed + i. stats: a GenerationStats to count
        the tokens in."""
        prompts = list(prompts)
        if not prompts:
            raise SqlgptError("no prompts to generate from")
        if len(prompts) > MAX_BATCH:
            raise SqlgptError(f"{len(prompts)} prompts: a batch holds at most {MAX_BATCH}")
        sampler = Sampler(temperature, top_k, top_p, min_p, repetition_penalty)
        ids = [self.prompt_ids(p) for p in prompts]
        texts = [TextStream(self.tokenizer, i, stop) for i in ids]
        finished, counts = set(), [0] * len(prompts)
        start = time.perf_counter()
        for i, token in generate_batch(self.decoder(len(prompts)), ids, max_tokens, sampler,
                                       seed, self._banned(allow_unk), self.tokenizer.eos_id,
                                       finished):
            counts[i] += 1
            if stats is not None:
                stats.tokens += 1
            texts[i].push(token)
            if texts[i].stopped:
                finished.add(i)
        seconds = time.perf_counter() - start
        for t in texts:
            t.finish()
        return [Completion(p, t.shown, n, seconds) for p, t, n in zip(prompts, texts, counts)]

    def beam_search(self, prompt="", num_beams=4, max_tokens=50, length_penalty=1.0,
                    allow_unk=False, prompt_ids=None, end_id=None):
        """The num_beams most likely continuations of prompt by beam search
        (sqlgpt.inference.beam), best first: Beams with the text after the
        prompt, the ids, their summed log-probability and score. One beam
        is greedy decoding. prompt_ids (and end_id, the id a continuation
        ends at: default <eos>) instead of a prompt's text: a chat turn's."""
        ids = self.prompt_ids(prompt) if prompt_ids is None else prompt_ids
        found = beam_search(self.decoder(num_beams), ids, num_beams, max_tokens, length_penalty,
                            self.tokenizer.eos_id if end_id is None else end_id,
                            self._banned(allow_unk))
        before = self.decode(ids)
        return [Beam(self._after(before, ids, h.ids), h.ids, h.logprob, h.score, h.finished)
                for h in found]

    def _after(self, before, prompt_ids, new):
        """The text new ids add after the prompt (decoded together, so a
        character split across the boundary stays whole)."""
        text = self.decode(list(prompt_ids) + list(new))
        return text[len(before):] if text.startswith(before) else self.decode(new)

    def embed(self, text):
        """text's embedding (see embed_ids)."""
        return self.embed_ids(self.encode(text))

    def embed_ids(self, ids, on_window=None):
        """The mean of the final hidden states (after the final norm, where
        the model has one) over the ids, in windows of the context: a
        float32 vector of embed_dim values (what sqlgpt_embed returns).
        on_window() is called before each window."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if not len(ids):
            raise SqlgptError("the text has no tokens")
        gpt, T = self._gpt, self.arch.seq_len
        total = np.zeros(self.arch.embed_dim, dtype=np.float64)
        for start in range(0, len(ids), T):
            if on_window:
                on_window()
            window = ids[start:start + T][None]
            gpt.forward(window)
            hidden = gpt.acts.buffers["lnf" if gpt.arch.final_norm else "x_final"]
            total += hidden[:window.shape[1]].sum(axis=0, dtype=np.float64)
        return (total / len(ids)).astype(np.float32)

    # ---- chat ----
    def classify_scores(self, texts):
        """Each text's probability of every label, {label: p} (a classifier's:
        finetune --task classify); one text gives one dict, a list a list."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if not self.labels:
            raise SqlgptError("this model is not a classifier (fine-tune one with "
                              "--task classify)")
        if not batch:
            return []
        probs, _ = probabilities(self._gpt, encode_texts(self.tokenizer, batch, self.arch.seq_len))
        scored = [dict(zip(self.labels, map(float, row))) for row in probs]
        return scored[0] if single else scored

    def classify(self, texts):
        """Each text's most probable label: one text gives one label, a list a list."""
        scored = self.classify_scores(texts)
        best = lambda scores: max(scores, key=scores.get)  # the first of equals: argmax's
        return best(scored) if isinstance(texts, str) else [best(s) for s in scored]

    def chat_format(self, template=None):
        """The ChatFormat of a template (default: the model's own, else
        sqlgpt's default template) with this model's tokenizer."""
        template = template or self.chat_template or DEFAULT_TEMPLATE
        if template not in self._chat_formats:
            self._chat_formats = {template: ChatFormat(self.tokenizer, template)}
        return self._chat_formats[template]

    def chat_prompt(self, messages, template=None):
        """The ids that prompt the assistant's reply to messages, refused
        when they leave no room in the context for one."""
        ids = self.chat_format(template).prompt(messages)
        if len(ids) >= self.arch.seq_len:
            raise SqlgptError(f"the conversation is {len(ids)} tokens; the model's context is "
                              f"{self.arch.seq_len}: drop earlier messages")
        return ids

    def chat_stream(self, messages, max_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                    seed=None, stop=(), template=None, min_p=0.0, repetition_penalty=1.0,
                    stats=None):
        """Yield the assistant's reply to messages ([{"role", "content"}...],
        roles system, user and assistant) in pieces as its tokens come,
        rendered by the model's chat template (or template); the reply ends
        at the template's end token (not shown), a stop string, or after
        max_tokens."""
        chat = self.chat_format(template)
        prompt = self.chat_prompt(messages, template)
        sampler = Sampler(temperature, top_k, top_p, min_p, repetition_penalty)
        drawn = (token for _, token in generate_batch(self.decoder(), [prompt], max_tokens,
                                                      sampler, seed, self._banned(False),
                                                      chat.end_id))
        yield from TextStream(self.tokenizer, prompt, stop).pieces(drawn, stats)

    def chat(self, messages, max_tokens=256, temperature=1.0, top_k=0, top_p=1.0, seed=None,
             stop=(), template=None, num_beams=1, length_penalty=1.0, **options):
        """The assistant's reply to messages, as text (see chat_stream); with
        num_beams > 1, the best reply beam search finds (sampling settings
        then do not apply)."""
        if num_beams > 1:
            return self.chat_beams(messages, num_beams, max_tokens, length_penalty,
                                   template)[0].text
        return "".join(self.chat_stream(messages, max_tokens, temperature, top_k, top_p, seed,
                                        stop, template, **options))

    def chat_beams(self, messages, num_beams=4, max_tokens=256, length_penalty=1.0,
                   template=None):
        """The num_beams best replies to messages by beam search, best first
        (Beams; each ends at the template's end token)."""
        return self.beam_search(num_beams=num_beams, max_tokens=max_tokens,
                                length_penalty=length_penalty,
                                prompt_ids=self.chat_prompt(messages, template),
                                end_id=self.chat_format(template).end_id)

    def evaluate_chat(self, path, batch_size=8, template=None, max_tokens=256):
        """Scores on held-out conversations (a JSON Lines file as --chat
        reads): loss, perplexity and accuracy on the assistant's tokens
        alone, and exact_match: how often the greedy reply to each
        conversation but its last message equals that message (an
        assistant's), ignoring the whitespace around it."""
        chat = self.chat_format(template)
        ids, flags, hits, asked = [], [], 0, 0
        for _, messages in read_conversations(path):
            found = fitted(chat, messages, self.arch.seq_len + 1)
            if found is None:
                continue
            conversation, mask, _ = found
            ids.append(conversation)
            flags.append(np.where(mask, SCORED, 0).astype(np.uint8))
            flags[-1][0] |= START
            if messages[-1]["role"] == "assistant":
                asked += 1
                reply = self.chat(messages[:-1], max_tokens, temperature=0, template=template)
                hits += reply.strip() == messages[-1]["content"].strip()
        if not ids:
            raise SqlgptError(f"{path} has no conversation whose first reply fits the context")
        held = ChatTokens(np.concatenate(ids), np.concatenate(flags), self.tokenizer.eos_id)
        scores = evaluate_chat(self._gpt, held, batch_size).to_dict()
        return {**scores, "exact_match": hits / asked if asked else None,
                "conversations": len(ids)}

    def evaluate(self, text=None, paths=(), stride=None, batch_size=8, extensions=(),
                 encoding_errors="strict", on_progress=None):
        """Loss per token, perplexity, accuracy and tokens scored on a text,
        or on files and directories (each a document, separated by <eos>),
        tokenized by a stream into a temporary file (flat memory). stride:
        see sqlgpt.train.evaluate (default: half the context). A model loaded
        with precision bf16, int8 or int4 is scored through those weights,
        as generation uses them. on_progress(windows done, windows) follows
        the scoring."""
        decoder = None if self.precision == "fp32" else self.decoder()
        if text is not None:
            return evaluate(self._gpt, self.encode(text), stride, batch_size, decoder=decoder,
                            on_progress=on_progress)
        with tempfile.TemporaryDirectory() as tmp:
            sources = find_sources(paths, extensions, spool_dir=tmp)
            info = write_tokens(sources, self.tokenizer, Path(tmp) / "eval.tokens",
                                encoding_errors)
            tokens = np.memmap(Path(tmp) / "eval.tokens", dtype=np.dtype(info["dtype"]),
                               mode="r")
            return evaluate(self._gpt, tokens, stride, batch_size, decoder=decoder,
                            on_progress=on_progress)


def load(path, precision="fp32", step=None, prefix=""):
    """Load the latest checkpoint of a sqlgpt database (read-only), or with
    step an older one that `train --keep` kept. With precision "bf16" or
    "f16", generation reads the matrices rounded to bfloat16 or IEEE half
    (an F16 import's own values); "int8" and "int4" read the stored integer
    copy. prefix: the model
    kept under that table prefix inside an app's database.

    A file whose weights never change (an import, a compacted copy) is
    checked and read when its weights are first needed (Model.read_weights
    reads them now), and generation reads them tensor by tensor into the
    decoder alone; a file that may be training is read whole here."""
    check_precision(precision)
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise SqlgptError(f"step must be an integer >= 0, got {step!r}")
    with store.snapshot(path, prefix) as conn:  # a trainer may commit while we read
        # an import's or compacted file's weights are read when first needed
        later = step is None and store.weights_fixed(store.read_train_state(conn))
        gpt, cfg, tokenizer, step, state = store.read_checkpoint(conn, path, step, lazy=later)
        if later:
            later = store.LaterRead(conn, path, prefix)
        quantized = _read_quantized(conn, path, gpt.arch, precision, step) \
            if precision in BITS else None
        labels = store.read_labels(conn, gpt.arch.num_labels) if gpt.arch.num_labels else []
    template = state.get("chat_template")
    model = Model(gpt, cfg, tokenizer, step, precision, corpus_of(state), quantized,
                  template if isinstance(template, str) and template else None)
    model.chat_tuned = model.chat_tuned or bool(state.get("chat"))  # a chat fine-tune's
    model.labels = labels
    model._later = later or None
    return model


def _read_quantized(conn, path, arch, precision, step):
    """The stored int8 / int4 copy for precision, refused where it is
    missing or was made from another checkpoint than step."""
    bits = BITS[precision]
    found = store.quantized_sets(conn).get(bits)
    if found is None:
        raise SqlgptError(f"{path} has no {precision} weights: make them with sqlgpt quantize "
                          f"--db {path} --bits {bits}")
    if found[1] != step:
        raise SqlgptError(f"the {precision} weights of {path} are from step {found[1]}, the "
                          f"model is at step {step}: quantize it again")
    return store.read_quantized(conn, quantized_shapes(arch), bits)


def quantize(path, bits, group=DEFAULT_GROUP, prefix=""):
    """Store int8 (bits 8) or int4 (bits 4) copies of the latest checkpoint's
    matrices in the database at path (a fine-tune's: its base with the
    adapters folded in), for decoding with precision "int8" / "int4".
    Returns {"bytes": the copy's size, "fp32_bytes": the float32 matrices'},
    or None when that copy is there already. Refuses another group size for
    a checkpoint that has a copy, a group size
    that does not divide every matrix's input width, and bits other than 8
    and 4; nothing is written then."""
    if bits not in BITS.values():
        raise SqlgptError(f"--bits must be 8 or 4, got {bits!r}")
    model = load(path, prefix=prefix)
    check_group(model.arch, group)
    with store.sqlite_errors(f"cannot read {path}"):
        conn = store.open_database(path, prefix=prefix)
        try:
            found = store.quantized_sets(conn).get(bits)
        finally:
            conn.close()
    if found == (group, model.step):
        return None  # the copy is there already: nothing to do, and that is success
    if found and found[1] == model.step:
        raise SqlgptError(f"{path} already has int{bits} weights of step {model.step} with "
                          f"group size {found[0]}, not {group}")
    blocks = quantized_copy(model.arch, model.state_dict_view(), bits, group)
    lock = store.WriterLock(path)
    try:
        with store.sqlite_errors(f"cannot write {path}"):
            conn = store.open_database(path, readonly=False, prefix=prefix)
            try:
                if store.read_train_state(conn).get("step") != model.step:
                    raise SqlgptError(f"{path} changed while it was being quantized; try again")
                store.write_quantized(conn, bits, group, model.step, blocks)
            finally:
                store.close_writer(conn)
    finally:
        lock.release()
    return {"bytes": sum(q.nbytes + s.nbytes for q, s in blocks.values()),
            "fp32_bytes": 4 * sum(spec.rows * spec.cols for spec in quant_matrices(model.arch))}


def export(path, out, fmt="hf", prefix="", dtype="f32"):
    """Write the model at path (a fine-tune's with its adapters folded in) in
    another format: "hf", a transformers directory at out (see sqlgpt.interop.hf;
    float32); "peft", a LoRA fine-tune's adapters as a PEFT directory for
    the hf export of its base; or "gguf", a llama.cpp file at out whose matrices are dtype
    (f32, f16 or q8_0; see sqlgpt.interop.gguf_export). Returns what was written
    (file names, or the tensor count)."""
    if fmt not in ("hf", "gguf", "peft"):
        raise SqlgptError(f"export format must be hf, gguf or peft, got {fmt!r}")
    model = load(path, prefix=prefix)
    if model.labels:  # its head would be left out without a word
        raise SqlgptError(f"{path} is a classifier: its head has no {fmt} form here; export "
                          f"the base model it was tuned from")
    if fmt in ("hf", "peft"):
        from .interop import hf, peft
        return (hf.export if fmt == "hf" else peft.export_peft)(model, out)
    from .interop import gguf_export
    if Path(out).exists():
        raise SqlgptError(f"{out} already exists; name a new file")
    tmp = Path(out).with_name(f".{Path(out).name}.{os.getpid()}.tmp")
    try:
        count = gguf_export.export(model, tmp, dtype)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def import_hf(directory, db_path, overwrite=False, prefix=""):
    """A new sqlgpt database at db_path from a transformers directory (gpt2,
    llama, qwen2 or mistral: config.json, safetensors weights, the model's
    tokenizer.json): it generates, evaluates, fine-tunes (--base) and
    exports; it has no training state to resume. Returns the new Model."""
    from .interop import hf
    arch, weights, tokenizer = hf.read_hf(directory)
    if tokenizer is None:
        raise SqlgptError(f"{directory} has no tokenizer.json: sqlgpt needs the model's "
                          f"tokenizer")
    return _create_imported(db_path, directory, arch, weights, tokenizer, overwrite, prefix,
                            extras={"chat_template": hf.read_chat_template(directory)})


def import_gguf(path, db_path, overwrite=False, prefix=""):
    """A new sqlgpt database at db_path from a llama.cpp GGUF file (llama,
    qwen2 or gpt2; F32, F16, BF16, Q8_0 or Q4_0; see sqlgpt.interop.gguf_import):
    a Q8_0/Q4_0 file's blocks are kept as the model's int8/int4 copy, and
    its chat template is kept with the model. Returns the new Model."""
    from .interop import gguf_import
    arch, weights, tokenizer, quantized, extras = gguf_import.read_gguf(path)
    return _create_imported(db_path, path, arch, weights, tokenizer, overwrite, prefix,
                            quantized, extras)


def _create_imported(db_path, source, arch, weights, tokenizer, overwrite, prefix,
                     quantized=None, extras=None):
    from .model.config import TrainConfig
    from .model.model import GPT
    store.check_new_location(Path(db_path), overwrite, store.check_prefix(prefix),
                             resumable=False)
    model = GPT(arch, training=False)  # stored as weights alone: no optimizer moments
    for t in model.params:  # each array let go once copied: the model is held once, not twice
        t.data[...] = weights.pop(t.name)
    _check_values(model.params)  # NaN or Inf weights are refused, as a load does
    cfg = TrainConfig(tokenizer=tokenizer.kind, vocab_size=arch.n_vocab)
    state = {"step": 0, "elapsed_s": 0.0, "imported_from": str(Path(source).resolve()),
             **{k: v for k, v in (extras or {}).items() if v is not None}}
    # each tensor kept in the narrowest format that holds it exactly (its
    # blocks, half, or float32): an F16 file is stored in half, a Q8_0 one's
    # matrices as their int8 rows alone
    formats = store.formats_of(arch, {t.name: t.data for t in model.params}, quantized)
    conn, lock = store.create_database(db_path, model, cfg, tokenizer, state, overwrite,
                                       prefix=prefix, stored=(formats, quantized))
    try:
        store.close_writer(conn)
    finally:
        lock.release()
    return load(db_path, prefix=prefix)


def quantized_shapes(arch):
    """{name: (input width, outputs)} of the matrices a quantized copy holds."""
    return {spec.name: spec.shape for spec in quant_matrices(arch)}


def merge(path, out_path, prefix=""):
    """Write out_path: the LoRA fine-tune at path as a plain model, every
    adapter folded into its matrix, W + (alpha / rank) A @ B (float32), with
    the fine-tune's config, tokenizer and history. Like a compacted file it
    generates, evaluates and starts new training (--init-from), but has no
    optimizer state to resume."""
    model = load(path, prefix=prefix)
    if model.lora is None:
        raise SqlgptError(f"{path} is not a LoRA fine-tune: there is nothing to merge")
    store.write_merged(path, out_path, model.arch, model.state_dict_view(), prefix)


def corpus_of(state):
    """The corpus a training state records (older files: its hash alone)."""
    tokens = state.get("tokens") if isinstance(state.get("tokens"), dict) else {}
    files = state.get("corpus") if isinstance(state.get("corpus"), list) else []
    return {"files": files, "sha256": state.get("corpus_sha256"), "tokens": tokens.get("count")}
