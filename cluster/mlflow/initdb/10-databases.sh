#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory (the official
# image executes /docker-entrypoint-initdb.d/*.sh). Creates the roles and databases prunetune
# uses; the passwords come from the container's environment, never from this file:
#   mlflow   -> databases mlflow (runs, metrics, registry) and mlflow_auth (users, permissions)
#   optuna   -> database optuna (the search's Optuna study, sampler.storage)
set -eu
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set}"
: "${OPTUNA_DB_PASSWORD:?OPTUNA_DB_PASSWORD must be set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v optuna_pw="$OPTUNA_DB_PASSWORD" <<'EOSQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE ROLE optuna LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;
EOSQL
