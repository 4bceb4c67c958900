"""Result tables shared by the benchmarks."""


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
