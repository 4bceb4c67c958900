-- sqlgpt database layout, schema version 6 (PRAGMA user_version).
--
-- One file holds a whole training state: config, vocabulary, every weight with
-- its Adam moments, the RNG and data position, and the training history.
-- A matrix is stored one row per matrix row: `data`, `m` and `v` are that row
-- as little-endian float32 BLOBs (4 bytes per column), and `crc` their
-- CRC-32 (zlib's, over data || m || v), checked on every load. A vector (a
-- norm's gain, a bias) is one such row, i = 0. Weight tables
-- are rowid tables: a row of up to ~64 KB stays on its 64 KB page, where an
-- index b-tree (WITHOUT ROWID) would spill rows over 16 KB into overflow pages
-- that each take a whole page. Every checkpoint
-- replaces the weights in one transaction, so a reader sees whole checkpoints.
-- Weight matrices are (in, out): y = x @ W. Which tensors a model has, and
-- their shapes, is sqlgpt/arch.py's tensor table for the stored architecture.
--
-- A model inside an app's own database (sqlgpt train --prefix gpt_) has
-- these tables and views under prefixed names (gpt_config, ...), created in
-- this order in one transaction, plus {prefix}schema (key, value) holding
-- ('application', 'sqlgpt') and ('version', N) in place of the file's
-- application_id and user_version, which stay the app's.
--
-- Older files are brought up to this version by the numbered migrations in
-- sqlgpt/store.py (MIGRATIONS) when they are opened for writing; read-only
-- opens read them as they are. Version 1 had no `norms`, `tokenizer` and
-- `evaluations` tables and no `metrics.grad_norm`, its `vocab` was (word,
-- id), and `config` had no architecture keys (it is the lua preset with the
-- word tokenizer). Version 2 had no `tensor_stats` and `checkpoint_weights`
-- tables, no `tensors` view and no `vocab.count`. Version 3 had no
-- `quantized` table.

-- Settings, under the original script's key names (vocab_size, embed_dim,
-- num_heads, num_layers, seq_len, lr, batch_size, max_iters, dropout, beta1,
-- beta2, eps), the other training settings (weight_decay, grad_clip,
-- lr_schedule, warmup_iters, seed, tokenizer) and, since version 2, the
-- architecture: preset, n_vocab, kv_heads, norm, norm_affine, norm_eps, pos,
-- rope_theta, mlp, ffn_dim, bias, tie_weights, final_norm, init (booleans as
-- 0/1). The fields of TrainConfig (sqlgpt/config.py) and ArchConfig
-- (sqlgpt/arch.py).
CREATE TABLE IF NOT EXISTS config (
    key   TEXT PRIMARY KEY,
    value                      -- a number, or text for preset/tokenizer
);

-- Every token id of the tokenizer, 0..n_vocab - 1 (since version 2; version 1
-- had `vocab(word TEXT PRIMARY KEY, id)`): `token` is readable text (bytes
-- that are not UTF-8 written as \xNN, specials as <pad>, <unk>, <bos>,
-- <eos>), `bytes` the token's exact bytes (NULL for the special tokens).
-- Special ids: word: <pad> = 0, words 1..vocab_size, <unk> = vocab_size + 1;
-- char, byte, bpe: <pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3.
-- `count` (since version 3): how often the id occurs in the tokenized
-- training corpus (NULL in files from before).
CREATE TABLE IF NOT EXISTS vocab (
    id    INTEGER PRIMARY KEY,
    token TEXT NOT NULL,
    bytes BLOB,
    count INTEGER
);

-- The rest of the tokenizer (since version 2), so that the file alone
-- encodes and decodes: `kind` (word, char, byte, bpe) and what that kind
-- needs, e.g. a BPE's merges in rank order (JSON [[left, right], ...]) and
-- its whole definition as the tokenizers library writes it (JSON).
CREATE TABLE IF NOT EXISTS tokenizer (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Token (wte, n_vocab x embed_dim, n_vocab = vocab_size + 2 for the word
-- tokenizer) and learned position (wpe, seq_len x embed_dim; only with pos =
-- learned) embeddings; `position` is the row: a token id for wte, a position
-- for wpe.
CREATE TABLE IF NOT EXISTS embeddings (
    type     TEXT NOT NULL CHECK (type IN ('wte', 'wpe')),
    position INTEGER NOT NULL,
    data     BLOB NOT NULL,
    m        BLOB NOT NULL,     -- Adam first moment
    v        BLOB NOT NULL,     -- Adam second moment
    crc      INTEGER NOT NULL,  -- CRC-32 of data || m || v: catches bad bytes inside BLOBs
    PRIMARY KEY (type, position)
);

-- Per-layer tensors, C = embed_dim, KV = kv heads x head size, F = the MLP's
-- hidden size; `i` is the matrix row (0 for a vector). Matrices: q (C x C),
-- k, v (C x KV), proj (C x C), gate (C x F, swiglu only), fc1 (C x F), fc2
-- (F x C). Vectors, each present only where the architecture has it: ln1_w,
-- ln1_b, ln2_w, ln2_b (norm gain and bias, C), and the biases q_b (C), k_b,
-- v_b (KV), proj_b (C), gate_b, fc1_b (F), fc2_b (C).
CREATE TABLE IF NOT EXISTS layers (
    layer     INTEGER NOT NULL,
    component TEXT NOT NULL,
    i         INTEGER NOT NULL,
    data      BLOB NOT NULL,
    m         BLOB NOT NULL,
    v         BLOB NOT NULL,
    crc       INTEGER NOT NULL,
    PRIMARY KEY (layer, component, i)
);

-- Output projection (embed x n_vocab); `i` is the matrix row. Empty when
-- the head is tied to wte (tie_weights): the head is then wte transposed.
CREATE TABLE IF NOT EXISTS head (
    i    INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    m    BLOB NOT NULL,
    v    BLOB NOT NULL,
    crc  INTEGER NOT NULL
);

-- Model-level tensors outside the layers other than the embeddings and the
-- head (since version 2): the final norm's gain lnf_w and bias lnf_b, each
-- one row (i = 0) of embed_dim values.
CREATE TABLE IF NOT EXISTS norms (
    name TEXT NOT NULL,
    i    INTEGER NOT NULL,
    data BLOB NOT NULL,
    m    BLOB NOT NULL,
    v    BLOB NOT NULL,
    crc  INTEGER NOT NULL,
    PRIMARY KEY (name, i)
);

-- A classifier's head (since version 5): cls_w (embed_dim rows of
-- num_labels values: row i is input unit i) and cls_b (one row, i = 0), on
-- the pooled final hidden state. Empty for a language model.
CREATE TABLE IF NOT EXISTS classifier (
    name TEXT NOT NULL,
    i    INTEGER NOT NULL,
    data BLOB NOT NULL,
    m    BLOB NOT NULL,
    v    BLOB NOT NULL,
    crc  INTEGER NOT NULL,
    PRIMARY KEY (name, i)
);

-- A classifier's labels (since version 5): the head's output `id` is the
-- label `name` (the text the training rows gave).
CREATE TABLE IF NOT EXISTS labels (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

-- A classifier's score on its held-out rows at a step (since version 5):
-- accuracy, the mean of the per-label F1 scores, and the confusion matrix as
-- JSON (rows: the true label's id, columns: the predicted one's).
CREATE TABLE IF NOT EXISTS classifier_evals (
    step       INTEGER PRIMARY KEY,
    loss       REAL NOT NULL,
    accuracy   REAL NOT NULL,
    macro_f1   REAL NOT NULL,
    confusion  TEXT NOT NULL,
    examples   INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- What exact resume needs besides weights: step, RNG state (JSON), the
-- corpus fingerprint, counters.
CREATE TABLE IF NOT EXISTS train_state (
    key   TEXT PRIMARY KEY,
    value
);

-- One row per saved checkpoint (the weights above are the latest one).
CREATE TABLE IF NOT EXISTS checkpoints (
    step       INTEGER PRIMARY KEY,
    train_loss REAL,            -- mean training loss since the previous checkpoint
    val_loss   REAL,            -- held-out loss, eval mode (NULL without a held-out split)
    elapsed_s  REAL NOT NULL,   -- training seconds so far, all runs together
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One row per evaluation of the held-out split (since version 2): at each
-- checkpoint, or every --eval-every steps. loss is the mean cross-entropy per
-- scored token, accuracy how often the most likely next token was right.
CREATE TABLE IF NOT EXISTS evaluations (
    step       INTEGER PRIMARY KEY,
    loss       REAL NOT NULL,
    perplexity REAL NOT NULL,
    accuracy   REAL NOT NULL,
    tokens     INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One row per training step, written as training runs.
CREATE TABLE IF NOT EXISTS metrics (
    step           INTEGER PRIMARY KEY,
    loss           REAL NOT NULL,
    lr             REAL NOT NULL,
    tokens_per_sec REAL NOT NULL,
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    grad_norm      REAL            -- the global gradient norm before clipping (since version 2)
);

-- Summary statistics of every stored parameter tensor at each checkpoint
-- (since version 3), written in the checkpoint's own transaction: `name` is
-- the tensor table's (wte, wpe, layers.0.q, ..., lnf_w, head; a tied head is
-- wte and has no row of its own), `layer` NULL outside the blocks, `rows` x
-- `cols` its shape (a vector is 1 x n), then the mean, standard deviation
-- (population), minimum, maximum and L2 norm of its values.
CREATE TABLE IF NOT EXISTS tensor_stats (
    step      INTEGER NOT NULL,
    name      TEXT NOT NULL,
    layer     INTEGER,
    component TEXT NOT NULL,
    rows      INTEGER NOT NULL,
    cols      INTEGER NOT NULL,
    mean      REAL NOT NULL,
    std       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    l2        REAL NOT NULL,
    PRIMARY KEY (step, name)
);

-- The latest checkpoint's tensors, one row each (since version 3).
CREATE VIEW IF NOT EXISTS tensors AS
    SELECT name, layer, component, rows, cols, mean, std, min, max, l2
    FROM tensor_stats
    WHERE step = (SELECT max(step) FROM tensor_stats);

-- Older checkpoints kept by `sqlgpt train --keep N` (since version 3): the
-- weights, without Adam's moments, of the last N checkpoints and of the one
-- with the best validation loss; the others are deleted in the transaction
-- that saves a new one. One row per matrix row: `name` is the tensor
-- table's, `i` the row, `data` the row as in the weight tables, `crc` zlib's
-- CRC-32 of data. The latest checkpoint is here too (and, with its moments,
-- in the weight tables).
CREATE TABLE IF NOT EXISTS checkpoint_weights (
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    i    INTEGER NOT NULL,
    data BLOB NOT NULL,
    crc  INTEGER NOT NULL,
    PRIMARY KEY (step, name, i)
);

-- Integer copies of the model's matrices for decoding (since version 4),
-- written by `sqlgpt quantize` and read by `--precision int8` / `int4`:
-- every matrix of the tensor table but the embeddings (`tensor` is its name:
-- layers.0.q, ..., head; a tied head is wte transposed), in symmetric groups
-- of `group_size` values along its input dimension, as llama.cpp's Q8_0
-- (bits 8) and Q4_0 (bits 4). One row per output unit `i` (a column of the
-- (in x out) matrix): `q` its in values, a signed byte each (bits 8), or two
-- per byte as value + 8 (bits 4: byte k of each run of 32 values holds its
-- element k in the low nibble and element k + 16 in the high one); `scales` one
-- little-endian float32 per group, value = scale * q; `crc` zlib's CRC-32 of
-- q || scales. `step` is the checkpoint the copy was made from: a model
-- trained further has stale copies, which are refused until quantized again.
CREATE TABLE IF NOT EXISTS quantized (
    tensor     TEXT NOT NULL,
    bits       INTEGER NOT NULL CHECK (bits IN (4, 8)),
    group_size INTEGER NOT NULL CHECK (group_size IN (32, 64)),
    step       INTEGER NOT NULL,
    i          INTEGER NOT NULL,
    q          BLOB NOT NULL,
    scales     BLOB NOT NULL,
    crc        INTEGER NOT NULL,
    PRIMARY KEY (tensor, bits, i)
);

-- How an imported tensor is stored where it is not float32 rows (since
-- version 6), so that a model keeps the precision it came in: `name` is the
-- tensor table's (wte, layers.0.q, lnf_w, ...) and `format` f16 or bf16 (its
-- rows in the weight tables hold cols IEEE half or bfloat16 values, two
-- little-endian bytes each, m and v empty, crc over data) or int8 or int4
-- (it has no rows in the weight tables: its values are its quantized copy's
-- of those bits, made from the file's Q8_0 / Q4_0 blocks; a tied wte's are
-- the head's rows). Only an import writes it, and only for tensors whose
-- values that format holds exactly; a tensor not named here is float32.
CREATE TABLE IF NOT EXISTS tensor_formats (
    name   TEXT PRIMARY KEY,
    format TEXT NOT NULL CHECK (format IN ('f16', 'bf16', 'int8', 'int4'))
);
