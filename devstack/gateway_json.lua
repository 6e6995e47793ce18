-- The gateway's strict JSON check, run by Envoy's Lua filter once the body has been read.
--
-- The transcoder's JSON parser (protobuf's) accepts trailing commas, single quotes and \x
-- escapes, so a body it reads may not be the body the caller meant. Before it, Envoy's
-- json_to_metadata filter parses the body with Envoy's own parser, which is strict (RFC 8259,
-- UTF-8 checked), and sets the key invalid_json in the dynamic metadata namespace "gateway" when
-- the body is not JSON. This script turns that into a 400 refusal, rendered as
-- google.rpc.Status JSON by the connection manager's local_reply_config like gateway_edge.lua's.
-- Native gRPC calls (a protobuf body) pass.

function envoy_on_request(handle)
  local content_type = handle:headers():get("content-type") or ""
  if content_type:sub(1, 16) == "application/grpc" then
    return
  end
  local verdict = handle:streamInfo():dynamicMetadata():get("gateway")
  if verdict == nil or verdict["invalid_json"] == nil then
    return
  end
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set("gateway", "reason", "MALFORMED_JSON")
  metadata:set("gateway", "code", 3)
  handle:respond({[":status"] = "400"},
    "the request body is not valid JSON (RFC 8259): no trailing commas, single quotes, comments or \\x escapes")
end
