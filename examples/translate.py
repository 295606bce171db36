"""Translation end to end: fine-tune a palm model to translate the names of countries, languages, scripts
and currencies from English to Chinese, in WMT's schema ({"translation": {"en": ..., "zh": ...}}), and
score it with sacreBLEU's BLEU and chrF++ against a dictionary baseline (the Chinese of the training
entry that shares most words with the source).

The data is built offline from the Unicode CLDR tables that the Babel package ships (its English and
Simplified Chinese display names): no download.

    python examples/translate.py --model demo/run/final --out runs/translate
    python examples/translate.py --out runs/translate --data-only
"""

from __future__ import annotations

from applications import Application, run


def cldr_rows() -> list[dict]:
    from babel import Locale

    en, zh = Locale("en"), Locale("zh", script="Hans")
    rows, seen = [], set()
    for table in ("territories", "languages", "scripts", "currencies"):
        english, chinese = getattr(en, table), getattr(zh, table)
        for key in sorted(english):
            source, target = english.get(key), chinese.get(key)
            if not source or not target or source == target or source in seen:
                continue
            seen.add(source)
            rows.append({"id": f"{table}.{key}", "translation": {"en": source, "zh": target}})
    return rows


def closest_entry(row, train) -> str:
    words = set(row.values["source"].lower().split())
    best = max(train, key=lambda t: len(words & set(t.values["source"].lower().split())))
    return best.completion if words & set(best.values["source"].lower().split()) else ""


APP = Application(
    steps=2000,
    task="translate",
    metrics=["chrf++", "bleu"],
    baseline_name="dictionary (closest training entry)",
    baseline=closest_entry,
    schema_flags=["--source-lang", "en", "--target-lang", "zh"],
    max_new_tokens=24,
    source="CLDR display names (Babel): English -> Simplified Chinese",
)

if __name__ == "__main__":
    run(APP, cldr_rows(), __doc__)
