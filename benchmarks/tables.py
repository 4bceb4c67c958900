"""Result tables shared by the benchmarks."""


def per_config_main(argv, doc, measure, header, configs, rounds):
    """A benchmark's command line: --configs, --rounds and --markdown, then
    measure(name, rounds)'s rows for every config, as one table."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--configs", default=configs)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    rows = [row for name in args.configs.split(",") for row in measure(name, args.rounds)]
    print(render(header, rows, args.markdown))


def render(header, rows, markdown):
    """A plain aligned table, or a Markdown one (numbers right-aligned)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(row):
        return "  ".join([row[0].ljust(widths[0])] +
                         [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
    return "\n".join([line(header), "-" * len(line(header))] + [line(r) for r in rows])
