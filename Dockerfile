# The operator's image; it also runs the compression Jobs (`leanserve compress`).
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

WORKDIR /opt/leanserve
COPY pyproject.toml README.md ./
COPY leanserve ./leanserve
# CPU torch from PyTorch's CPU index keeps the image small; the range matches pyproject.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.14" \
 && pip install . \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin leanserve

USER 10001:10001
ENTRYPOINT ["leanserve"]
CMD ["operator"]
