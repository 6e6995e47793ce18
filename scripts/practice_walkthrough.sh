#!/bin/bash
# A practice's features through grpcurl (and curl for the calendar feed) against `make run`
# (docs/practice.md): a weekly series across a DST change, a series refused whole, cancelling this
# and the following occurrences with the refund policy, the grid of starts, a calendar feed.
# Needs jq and python3; run from the repository with `make run` serving and its export lines pasted.
set -u
: "${ADMIN_TOKEN:?paste the export lines that make run prints}"
G=".venv/bin/grpcurl -plaintext -emit-defaults"
B=127.0.0.1:50051
C=127.0.0.1:50052
RUN=$RANDOM
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
say() { echo; echo "### $*"; }
say "a therapist in Europe/London, open 09:00-20:00 every day, a year's horizon; a 50-minute session type (10 credits)"
T=$($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-t-'$RANDOM'","therapist":{"display_name":"Dr. Weekly","time_zone":"Europe/London","booking_horizon_days":365}}' $B booking.v1.BookingService/CreateTherapist | jq -r .therapist.therapist_id)
W=$(python3 -c 'print(",".join("{\"day_of_week\":%d,\"window\":{\"start_time\":\"09:00\",\"end_time\":\"20:00\"}}" % d for d in range(1,8)))')
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"therapist_id":"'$T'","windows":['$W']}' $B booking.v1.BookingService/SetWeeklySchedule > /dev/null
S=$($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"therapist_id":"'$T'","request_id":"demo-s-'$RANDOM'","session_type":{"name":"Weekly","duration_minutes":50,"credit_cost":10,"late_cancellation_notice_minutes":1440,"late_cancellation_refund_percent":50}}' $B booking.v1.BookingService/CreateSessionType | jq -r .session_type.session_type_id)
echo "therapist $T, session type $S"
CL=$(python3 -c 'import uuid; print(uuid.uuid4())'); OTHER=$(python3 -c 'import uuid; print(uuid.uuid4())')
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-g-'$RANDOM'","owner_id":"'$CL'","amount":100,"kind":"GRANT_KIND_PURCHASE"}' $C credit.v1.CreditService/GrantCredits > /dev/null
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-g2-'$RANDOM'","owner_id":"'$OTHER'","amount":100,"kind":"GRANT_KIND_PURCHASE"}' $C credit.v1.CreditService/GrantCredits > /dev/null
# The Monday 18:00 local two weeks before the next change of the UK clocks: the series crosses it.
FIRST=$(python3 - <<'PY'
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo
z = ZoneInfo("Europe/London"); d = date.today() + timedelta(days=3)
while True:
    a, b = datetime.combine(d, datetime.min.time(), z), datetime.combine(d + timedelta(days=21), datetime.min.time(), z)
    if d.weekday() == 0 and a.utcoffset() != b.utcoffset(): break
    d += timedelta(days=1)
print(d.isoformat())
PY
)
say "a 4-week series at 18:00 local from $FIRST (client $CL): every occurrence at 18:00 local, across the DST change"
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-series-1-'$RUN'","client_id":"'$CL'","therapist_id":"'$T'","session_type_id":"'$S'","local_start":{"date_time":"'$FIRST'T18:00","time_zone":"Europe/London"},"occurrences":4}' \
  $B booking.v1.BookingService/CreateBookingSeries | tee "$TMP/series.json" | jq -c '{series_id, bookings: [.bookings[] | {series_index, local_start, start_time, payment_status}]}'
say "the client's balance: 40 credits spent, once per occurrence"
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"owner_id":"'$CL'"}' $C credit.v1.CreditService/GetBalance | jq -c .balance
say "another client books the third Monday's 18:00 of a second series alone first"
SECOND=$(python3 -c "from datetime import date, timedelta; print((date.fromisoformat('$FIRST') + timedelta(days=1)).isoformat())")
THIRD=$(python3 -c "from datetime import date, timedelta; print((date.fromisoformat('$SECOND') + timedelta(weeks=2)).isoformat())")
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-single-1-'$RUN'","client_id":"'$OTHER'","therapist_id":"'$T'","session_type_id":"'$S'","local_start":{"date_time":"'$THIRD'T18:00","time_zone":"Europe/London"}}' \
  $B booking.v1.BookingService/CreateBooking | jq -c '.booking | {local_start, status}'
BEFORE=$($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"owner_id":"'$CL'"}' $C credit.v1.CreditService/GetBalance | jq -c .balance)
say "a 4-week series from $SECOND 18:00 is refused whole, the taken occurrence named"
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-series-2-'$RUN'","client_id":"'$CL'","therapist_id":"'$T'","session_type_id":"'$S'","local_start":{"date_time":"'$SECOND'T18:00","time_zone":"Europe/London"},"occurrences":4}' \
  $B booking.v1.BookingService/CreateBookingSeries 2>&1 | head -20
say "balance and holds unchanged"
echo "before: $BEFORE"
echo "after:  $($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"owner_id":"'$CL'"}' $C credit.v1.CreditService/GetBalance | jq -c .balance)"
echo "pending holds: $($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"owner_id":"'$CL'","status":"RESERVATION_STATUS_PENDING"}' $C credit.v1.CreditService/ListReservations | jq '.reservations | length')"
say "cancel the second occurrence of the first series and every later one (the client): each refunded by the policy for its own start"
B2=$(jq -r '.bookings[1].booking_id' "$TMP/series.json")
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"booking_id":"'$B2'","actor":"CANCELLATION_ACTOR_CLIENT","reason":"CANCELLATION_REASON_SCHEDULE_CONFLICT"}' \
  $B booking.v1.BookingService/CancelFollowingBookings | jq -c '[.bookings[] | {series_index, local_start, status, refunded: .cancellation.refunded_credits}]'
sleep 1
echo "balance: $($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"owner_id":"'$CL'"}' $C credit.v1.CreditService/GetBalance | jq -c .balance)"
say "a second series whose first occurrence is 3 hours away (inside the session type's 24-hour late-cancellation notice, 50 % back), cancelled from its first occurrence"
SOON=$(python3 -c "from datetime import datetime, timedelta; from zoneinfo import ZoneInfo; t = (datetime.now(ZoneInfo('Europe/London')) + timedelta(hours=3)).replace(second=0, microsecond=0); t -= timedelta(minutes=t.minute % 15); print(t.strftime('%Y-%m-%dT%H:%M'))")
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-series-3-'$RUN'","client_id":"'$CL'","therapist_id":"'$T'","session_type_id":"'$S'","local_start":{"date_time":"'$SOON'","time_zone":"Europe/London"},"occurrences":3}' \
  $B booking.v1.BookingService/CreateBookingSeries > "$TMP/series-3.json"
N1=$(jq -r '.bookings[0].booking_id' "$TMP/series-3.json")
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"booking_id":"'$N1'","actor":"CANCELLATION_ACTOR_CLIENT","reason":"CANCELLATION_REASON_ILLNESS"}' \
  $B booking.v1.BookingService/CancelFollowingBookings | jq -c '[.bookings[] | {series_index, local_start, refunded: .cancellation.refunded_credits, payment_status}]'
sleep 1
echo "balance: $($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"owner_id":"'$CL'"}' $C credit.v1.CreditService/GetBalance | jq -c .balance)"
say "GetBooking shows the series"
B1=$(jq -r '.bookings[0].booking_id' "$TMP/series.json")
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"booking_id":"'$B1'"}' $B booking.v1.BookingService/GetBooking | jq -c '.booking | {booking_id, series_id, series_index, status}'
say "an off-grid start is refused"
$G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"request_id":"demo-offgrid-'$RUN'","client_id":"'$CL'","therapist_id":"'$T'","session_type_id":"'$S'","local_start":{"date_time":"'$FIRST'T10:10","time_zone":"Europe/London"}}' \
  $B booking.v1.BookingService/CreateBooking 2>&1 | head -12
say "a therapist's calendar feed over HTTP, through the gateway, without a bearer token"
FEED=$($G -H "authorization: Bearer $ADMIN_TOKEN" -d '{"therapist_id":"'$T'"}' $B booking.v1.BookingService/RotateCalendarFeed | jq -r .feed_path)
curl -s -i "http://127.0.0.1:8080$FEED" | head -45
