-- The database of MLflow's basic-auth users and permissions (docker/mlflow-auth.ini), beside
-- MLflow's own. Run once by the postgres image when its volume is new.
CREATE DATABASE mlflow_auth OWNER mlflow;
