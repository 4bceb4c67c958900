"""The server's counters, as Prometheus text (GET /metrics)."""
import threading

# time to first token: the buckets of its histogram, in seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}             # (path, status) -> count
        self.prompt_tokens = self.generated_tokens = 0
        self.first_token_counts = [0] * len(BUCKETS)
        self.first_token_sum, self.first_token_n = 0.0, 0

    def request(self, path, status):
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def tokens(self, prompt, generated):
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def first_token(self, seconds):
        with self.lock:
            self.first_token_sum += seconds
            self.first_token_n += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.first_token_counts[i] += 1

    def text(self, served):
        """The exposition text: requests by path and status, tokens, time to
        first token (a histogram), and each model's busy slots and queue."""
        with self.lock:
            lines = ["# HELP sqlgpt_requests_total HTTP requests by path and status.",
                     "# TYPE sqlgpt_requests_total counter"]
            lines += [f'sqlgpt_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self.requests.items())]
            lines += ["# HELP sqlgpt_prompt_tokens_total Prompt tokens read.",
                      "# TYPE sqlgpt_prompt_tokens_total counter",
                      f"sqlgpt_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP sqlgpt_generated_tokens_total Tokens generated.",
                      "# TYPE sqlgpt_generated_tokens_total counter",
                      f"sqlgpt_generated_tokens_total {self.generated_tokens}",
                      "# HELP sqlgpt_time_to_first_token_seconds From a request's arrival to "
                      "its first token.",
                      "# TYPE sqlgpt_time_to_first_token_seconds histogram"]
            lines += [f'sqlgpt_time_to_first_token_seconds_bucket{{le="{_le(b)}"}} {n}'
                      for b, n in zip(BUCKETS, self.first_token_counts)]
            lines += [f"sqlgpt_time_to_first_token_seconds_sum {self.first_token_sum:.6f}",
                      f"sqlgpt_time_to_first_token_seconds_count {self.first_token_n}"]
        lines += ["# HELP sqlgpt_slots_busy Sequences being decoded.",
                  "# TYPE sqlgpt_slots_busy gauge"]
        lines += [f'sqlgpt_slots_busy{{model="{name}"}} {s.scheduler.busy()}'
                  for name, s in served.items()]
        lines += ["# HELP sqlgpt_queue_length Requests waiting for a slot.",
                  "# TYPE sqlgpt_queue_length gauge"]
        lines += [f'sqlgpt_queue_length{{model="{name}"}} {s.scheduler.waiting()}'
                  for name, s in served.items()]
        return "\n".join(lines) + "\n"


def _le(bound):
    return "+Inf" if bound == float("inf") else f"{bound:g}"
