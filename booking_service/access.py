"""Who may call what (docs/security.md), and who may see a booking."""

from __future__ import annotations

from booking.v1 import booking_pb2
from booking_service import domain
from service_kit.auth import (
    ADMIN,
    CLIENT,
    OPEN_TO_ANYONE,
    SERVICE,
    THERAPIST,
    AccessRules,
    Principal,
    anyone_with,
    either,
    own,
)

# Who may call what (docs/security.md). The catalogue (therapists, schedules, session types,
# slots) is readable by every signed-in caller; a therapist changes only its own; a client books
# only for itself. Get, cancel and reschedule need the booking to know whose it is: the rule lets
# the roles in, the servicer checks the owner (NOT_FOUND for another's, so it looks missing).
_READERS = anyone_with(CLIENT, THERAPIST, ADMIN)
_THERAPIST_SELF = either(anyone_with(ADMIN), own(THERAPIST, "therapist_id"))
ACCESS_RULES: AccessRules = {
    "CreateTherapist": anyone_with(ADMIN),
    "GetTherapist": _READERS,
    "UpdateTherapist": either(anyone_with(ADMIN), own(THERAPIST, "therapist.therapist_id")),
    "SetWeeklySchedule": _THERAPIST_SELF,
    "SetDateOverride": _THERAPIST_SELF,
    "DeleteDateOverride": _THERAPIST_SELF,
    "GetSchedule": _READERS,
    "CreateSessionType": _THERAPIST_SELF,
    "ListSessionTypes": _READERS,
    "ListAvailableSlots": _READERS,
    "CreateBooking": either(anyone_with(ADMIN), own(CLIENT, "client_id")),
    "GetBooking": _READERS,
    "ListBookings": either(
        anyone_with(ADMIN),
        lambda principal, request: not request.therapist_id and own(CLIENT, "client_id")(principal, request),
        lambda principal, request: not request.client_id and own(THERAPIST, "therapist_id")(principal, request),
    ),
    "CancelBooking": _READERS,
    "RescheduleBooking": _READERS,
    # Operators only: dead letters carry other people's bookings.
    "ListDeadLetters": anyone_with(ADMIN),
    "RetryDeadLetter": anyone_with(ADMIN),
    # Discovery is the catalogue's: readable by every signed-in caller.
    "ListTherapists": _READERS,
    "SearchAvailability": _READERS,
    "ArchiveTherapist": anyone_with(ADMIN),
    "UnarchiveTherapist": anyone_with(ADMIN),
    "UpdateSessionType": either(anyone_with(ADMIN), own(THERAPIST, "session_type.therapist_id")),
    "RetireSessionType": _THERAPIST_SELF,
    # Webhook endpoints are the operators'. An endpoint's partner (role `service`, subject =
    # partner_id) reads it, its log and its deliveries and retries a dead one: the rule lets the
    # role in, the servicer checks the partner (NOT_FOUND for another's, so it looks missing).
    "CreateWebhookEndpoint": anyone_with(ADMIN),
    "ListWebhookEndpoints": anyone_with(ADMIN),
    "UpdateWebhookEndpoint": anyone_with(ADMIN),
    "RotateWebhookSecret": anyone_with(ADMIN),
    "DisableWebhookEndpoint": anyone_with(ADMIN),
    "EnableWebhookEndpoint": anyone_with(ADMIN),
    "DeleteWebhookEndpoint": anyone_with(ADMIN),
    "GetWebhookEndpoint": anyone_with(ADMIN, SERVICE),
    "ListWebhookAttempts": anyone_with(ADMIN, SERVICE),
    "ListWebhookDeliveries": anyone_with(ADMIN, SERVICE),
    "RetryWebhookDelivery": anyone_with(ADMIN, SERVICE),
    # A practice (issue 16): a client books its own series; the rest as for single bookings.
    "CreateBookingSeries": either(anyone_with(ADMIN), own(CLIENT, "client_id")),
    "CancelFollowingBookings": _READERS,
    # The therapist of the session (the servicer checks whose it is) or an admin; never a client.
    "RecordSessionOutcome": anyone_with(THERAPIST, ADMIN),
    # A feed's owner (or an admin) rotates its token; the feed itself is fetched with that token.
    "RotateCalendarFeed": either(
        anyone_with(ADMIN),
        lambda principal, request: bool(request.therapist_id) and own(THERAPIST, "therapist_id")(principal, request),
        lambda principal, request: bool(request.client_id) and own(CLIENT, "client_id")(principal, request),
    ),
    "GetCalendarFeed": OPEN_TO_ANYONE,
    # A client waits for itself; the servicer checks whose entry or offer it is (NOT_FOUND else).
    "JoinWaitlist": either(anyone_with(ADMIN), own(CLIENT, "client_id")),
    "GetWaitlistEntry": anyone_with(CLIENT, ADMIN),
    "LeaveWaitlist": anyone_with(CLIENT, ADMIN),
    "AcceptWaitlistOffer": anyone_with(CLIENT, ADMIN),
}
# Which cancellation actor each role may speak as (an admin may act for anyone).
ACTORS_OF_ROLE = {
    CLIENT: {booking_pb2.CANCELLATION_ACTOR_CLIENT},
    THERAPIST: {booking_pb2.CANCELLATION_ACTOR_THERAPIST},
    ADMIN: {
        booking_pb2.CANCELLATION_ACTOR_CLIENT,
        booking_pb2.CANCELLATION_ACTOR_THERAPIST,
        booking_pb2.CANCELLATION_ACTOR_ADMIN,
    },
}


def may_see(principal: Principal, booking: domain.Booking) -> bool:
    return (
        principal.has(ADMIN)
        or (principal.has(CLIENT) and principal.is_subject(str(booking.client_id)))
        or (principal.has(THERAPIST) and principal.is_subject(str(booking.therapist_id)))
    )
