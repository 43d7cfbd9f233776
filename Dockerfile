# The one image every pointmesh service runs from (k8s/ picks the command per Deployment).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home pointmesh
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY pointmesh ./pointmesh
COPY ledger_svc ./ledger_svc
COPY rules_svc ./rules_svc
COPY fraud_svc ./fraud_svc
COPY gateway ./gateway
RUN pip install --no-cache-dir -c constraints.txt .
USER 10001
ENV POINTMESH_DATA_DIR=/var/lib/pointmesh
ENTRYPOINT []
CMD ["pointmesh", "up"]
