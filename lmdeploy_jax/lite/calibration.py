"""Calibration tokens for ``lite auto_awq``: ``samples`` windows of ``seqlen`` tokens drawn from a
text, as LMDeploy's ``get_calib_loaders`` draws them (random start positions in the tokenized
text, seeded). The text is a local file (UTF-8) or one of LMDeploy's named hub datasets, which
need the ``datasets`` package and a reachable hub."""
from __future__ import annotations

import os

import numpy as np

# LMDeploy's --calib-dataset names -> (datasets.load_dataset arguments, text field)
HUB_DATASETS = {
    'wikitext2': (('wikitext', 'wikitext-2-raw-v1'), {'split': 'train'}, 'text'),
    'c4': (('allenai/c4',), {'data_files': {'train': 'en/c4-train.00000-of-01024.json.gz'}, 'split': 'train'},
           'text'),
    'pileval': (('mit-han-lab/pile-val-backup',), {'split': 'validation'}, 'text'),
    'openwebtext': (('Skylion007/openwebtext',), {'split': 'train'}, 'text'),
}
# LMDeploy's names of chat datasets, which it renders through the chat template: not taken here
CHAT_DATASETS = ('gsm8k', 'neuralmagic_calibration', 'open-platypus')
SEED = 0


def calibration_text(dataset: str) -> str:
    """The text of ``dataset``: a local file's contents, or a named hub dataset's records joined
    by blank lines. ValueError naming ``--calib-dataset`` when the file is empty or not UTF-8, the
    name is neither a file nor a known dataset, or the hub dataset cannot be fetched."""
    if os.path.isfile(dataset):
        try:
            with open(dataset, encoding='utf-8') as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f'--calib-dataset {dataset!r}: not a UTF-8 text file ({e})') from None
        if not text.strip():
            raise ValueError(f'--calib-dataset {dataset!r}: the file is empty')
        return text
    if dataset in CHAT_DATASETS:
        raise ValueError(f'--calib-dataset {dataset!r}: the chat-formatted calibration sets are not supported; '
                         f'use a plain-text one ({", ".join(HUB_DATASETS)}) or a local text file')
    if dataset not in HUB_DATASETS:
        raise ValueError(f'--calib-dataset {dataset!r} is neither a text file nor one of the named datasets '
                         f'({", ".join(HUB_DATASETS)})')
    return _hub_text(dataset)


def _hub_text(name: str) -> str:
    args, kwargs, field = HUB_DATASETS[name]
    try:
        from datasets import load_dataset
        records = load_dataset(*args, **kwargs)
    except Exception as e:       # ImportError, or any failure to reach or read the hub
        raise ValueError(f'--calib-dataset {name!r}: cannot fetch the hub dataset {args[0]!r} '
                         f'({type(e).__name__}: {e}); pass a local text file instead') from None
    return '\n\n'.join(str(r[field]) for r in records)


def calibration_tokens(token_ids: list[int], samples: int, seqlen: int) -> np.ndarray:
    """int32 ``[samples, seqlen]``: windows of ``token_ids`` at seeded random starts (they may
    overlap when the text is short). ValueError naming ``--calib-seqlen`` when the text has fewer
    than ``seqlen + 1`` tokens."""
    if len(token_ids) <= seqlen:
        raise ValueError(f'--calib-seqlen {seqlen}: the calibration text has only {len(token_ids)} tokens; '
                         'pass a longer text or a shorter --calib-seqlen')
    starts = np.random.default_rng(SEED).integers(0, len(token_ids) - seqlen, size=samples)
    ids = np.asarray(token_ids, np.int32)
    return np.stack([ids[s:s + seqlen] for s in starts])
