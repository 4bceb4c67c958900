-- sqlgpt database layout, schema version 1 (PRAGMA user_version).
--
-- One file holds a whole training state: config, vocabulary, every weight with
-- its Adam moments, the RNG and data position, and the training history.
-- A matrix is stored one row per matrix row: `data`, `m` and `v` are that row
-- as little-endian float32 BLOBs (4 bytes per column), and `crc` their
-- CRC-32 (zlib's, over data || m || v), checked on every load. Weight tables
-- are rowid tables: a row of up to ~64 KB stays on its 64 KB page, where an
-- index b-tree (WITHOUT ROWID) would spill rows over 16 KB into overflow pages
-- that each take a whole page. Every checkpoint
-- replaces the weights in one transaction, so a reader sees whole checkpoints.
-- Weight matrices are (in, out): y = x @ W.

-- Settings, under the original script's key names (vocab_size, embed_dim,
-- num_heads, num_layers, seq_len, lr, batch_size, max_iters, dropout, beta1,
-- beta2, eps) plus weight_decay, seed, preset and tokenizer.
CREATE TABLE IF NOT EXISTS config (
    key   TEXT PRIMARY KEY,
    value                      -- a number, or text for preset/tokenizer
);

-- Tokens and their ids: <pad> = 0, words 1..vocab_size, <unk> = vocab_size + 1.
CREATE TABLE IF NOT EXISTS vocab (
    word TEXT PRIMARY KEY,
    id   INTEGER NOT NULL UNIQUE
);

-- Token (wte, (vocab_size + 2) x embed_dim) and position (wpe, seq_len x
-- embed_dim) embeddings; `position` is the row: a token id for wte, a
-- position for wpe.
CREATE TABLE IF NOT EXISTS embeddings (
    type     TEXT NOT NULL CHECK (type IN ('wte', 'wpe')),
    position INTEGER NOT NULL,
    data     BLOB NOT NULL,
    m        BLOB NOT NULL,     -- Adam first moment
    v        BLOB NOT NULL,     -- Adam second moment
    crc      INTEGER NOT NULL,  -- CRC-32 of data || m || v: catches bad bytes inside BLOBs
    PRIMARY KEY (type, position)
);

-- Per-layer matrices: q, k, v, proj (embed x embed), fc1 (embed x 4*embed),
-- fc2 (4*embed x embed); `i` is the matrix row.
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

-- Output projection (embed x (vocab_size + 2)); `i` is the matrix row.
CREATE TABLE IF NOT EXISTS head (
    i    INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    m    BLOB NOT NULL,
    v    BLOB NOT NULL,
    crc  INTEGER NOT NULL
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

-- One row per training step, written as training runs.
CREATE TABLE IF NOT EXISTS metrics (
    step           INTEGER PRIMARY KEY,
    loss           REAL NOT NULL,
    lr             REAL NOT NULL,
    tokens_per_sec REAL NOT NULL,
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
