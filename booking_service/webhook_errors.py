"""The webhook endpoints' errors: an unknown endpoint or delivery, too many endpoints, the retry
of a delivery that is not dead. No I/O; the servicer maps them through NotFound and Refused."""

from __future__ import annotations

import uuid

from booking_service.domain import NotFound, Refused


class WebhookEndpointNotFound(NotFound):
    reason = "WEBHOOK_ENDPOINT_NOT_FOUND"

    def __init__(self, endpoint_id: uuid.UUID) -> None:
        super().__init__("webhook endpoint", endpoint_id)


class WebhookDeliveryNotFound(NotFound):
    reason = "WEBHOOK_DELIVERY_NOT_FOUND"

    def __init__(self, delivery_id: uuid.UUID) -> None:
        super().__init__("webhook delivery", delivery_id)


class WebhookEndpointLimit(Refused):
    """At most MAX_WEBHOOK_ENDPOINTS endpoints: each is called for every event it subscribes to."""

    reason = "WEBHOOK_ENDPOINT_LIMIT"


class WebhookDeliveryNotDead(Refused):
    reason = "WEBHOOK_DELIVERY_NOT_DEAD"

    def __init__(self, delivery_id: uuid.UUID) -> None:
        super().__init__(
            f"webhook delivery {delivery_id} is not dead: only a dead delivery is retried by hand",
            metadata={"delivery_id": str(delivery_id)},
        )
