"""Classifiers: a base model's trunk with a head over its pooled final
hidden state (the kernel's model_classify_*), fine-tuned on labelled texts
from an app's tables, a CSV file or JSON Lines."""
