"""The store: a model's SQLite database. Every SQL statement of sqlgpt
lives in this package; the rest of sqlgpt reads and writes models through
the functions named here."""
from .database import (APPLICATION_ID, MIGRATIONS, REQUIRED_TABLES, SCHEMA_VERSION, SELECT_SQL,
                       WriterLock, check_prefix, check_writable, checkpoints, close_writer,
                       compact, create_database, has_model, integrity_check, is_sqlgpt_file,
                       kept_steps, model_names, open_database, prefixed, quantized_sets,
                       read_config, read_kept_weights, read_quantized, read_tokenizer,
                       read_train_state, read_weights, row_crc, row_crcs, save_checkpoint,
                       schema_sql, schema_version, sqlite_errors, tables_at, weight_tables,
                       write_evaluation, write_merged, write_metrics, write_quantized)
from .models import check_new_location, model_for, read_checkpoint, read_lora, snapshot
from .queries import read_curves
