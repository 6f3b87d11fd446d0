from django.apps import AppConfig
from django.conf import settings


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Sagas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from sagas.definitions import registry

        registry.load(settings.SAGA_MODULES)
