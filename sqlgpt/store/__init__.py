"""The store: a model's SQLite database, and every SQL statement sqlgpt
runs: creating a database, checkpoints (one transaction each), loading with
validation of everything read, and the numbered migrations that bring older
files up to SCHEMA_VERSION. The rest of sqlgpt reads and writes models
through the functions named here.

Where each tensor's rows live comes from its TensorSpec (arch.py's tensor
table): its layer and component, never its name's spelling.

A database is created whole: schema, config, vocabulary and the step-0
checkpoint are written to a temporary file which is then renamed into place,
so the path never holds a half-made model. Later checkpoints replace the
weights inside one BEGIN IMMEDIATE ... COMMIT, so readers (WAL) and a crash
only ever see the previous checkpoint or the new one.

connection.py: prefixes, connections, schema version and objects, errors,
    the writer lock, transactions
rows.py: where rows live, the row codec, reading everything back validated
migrations.py: opening an existing file (its checks) and its migrations
database.py: creating, checkpoints, history, quantized copies, compact, merge
models.py: a whole model read in one snapshot; where a new one may go
queries.py: the canned questions (README, Datasette) and the learning curves
"""
from .connection import (APPLICATION_ID, REQUIRED_TABLES, SCHEMA_VERSION, WriterLock,
                         check_prefix, check_writable, close_writer, is_sqlgpt_file, prefixed,
                         schema_sql, schema_version, sqlite_errors, tables_at)
from .database import (checkpoints, compact, create_database, has_model, integrity_check,
                       kept_steps, model_names, read_kept_weights,
                       save_checkpoint, write_evaluation, write_merged, write_metrics,
                       write_quantized)
from .migrations import MIGRATIONS, open_database
from .models import (LaterRead, StoredTensors, check_new_location, model_for, read_checkpoint,
                     read_lora, snapshot, weights_fixed)
from .queries import read_curves
from .app_rows import labelled_sql_source, sql_sources
from .classifier import (read_classifier_evals, read_labels, write_classifier_eval,
                         write_labels)
from .rows import (SELECT_SQL, formats_of, quantized_sets, read_config, read_formats,
                   read_quantized, read_tokenizer, read_train_state, read_weights, row_crc,
                   row_crcs, stored_parameters, weight_tables)
