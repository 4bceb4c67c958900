"""sqlgpt inside other tools, as their plugins: Datasette (the SQL
functions on every database it serves) and llm (models to prompt, chat with
and embed). Each is an entry point of this package: installing sqlgpt is
installing them."""
