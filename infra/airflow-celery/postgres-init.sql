-- MLflow's tracking DB next to Airflow's metadata DB (same server, own database)
CREATE DATABASE mlflow OWNER airflow;
