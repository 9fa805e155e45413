"""The shapes Consul's agent decodes: one `Schema` per request body or config-file block.

Field names are canonical CamelCase; `proxy.devagent.decode` matches what clients send
against them (case-insensitively, snake_case included) and checks the JSON types.
"""

from __future__ import annotations

from proxy.devagent.decode import Kind, ListOf, MapOf, Schema

CHECK = Schema(
    "CheckType",
    {
        "CheckID": "str",
        "Name": "str",
        "Status": "str",
        "Notes": "str",
        "ServiceID": "str",
        "ScriptArgs": ListOf("str"),
        "HTTP": "str",
        "Header": "raw",
        "Method": "str",
        "Body": "str",
        "DisableRedirects": "bool",
        "TCP": "str",
        "TCPUseTLS": "bool",
        "UDP": "str",
        "Interval": "duration",
        "Timeout": "duration",
        "TTL": "duration",
        "AliasNode": "str",
        "AliasService": "str",
        "DeregisterCriticalServiceAfter": "duration",
        "TLSServerName": "str",
        "TLSSkipVerify": "bool",
        "GRPC": "str",
        "GRPCUseTLS": "bool",
        "H2PING": "str",
        "H2PingUseTLS": "bool",
        "DockerContainerID": "str",
        "Shell": "str",
        "OSService": "str",
        "SuccessBeforePassing": "int",
        "FailuresBeforeWarning": "int",
        "FailuresBeforeCritical": "int",
        "OutputMaxSize": "int",
    },
    aliases={"ID": "CheckID", "Args": "ScriptArgs"},
)

MESH_GATEWAY = Schema("MeshGatewayConfig", {"Mode": "str"})

UPSTREAM = Schema(
    "Upstream",
    {
        "DestinationType": "str",
        "DestinationNamespace": "str",
        "DestinationPartition": "str",
        "DestinationPeer": "str",
        "DestinationName": "str",
        "Datacenter": "str",
        "LocalBindAddress": "str",
        "LocalBindPort": "int",
        "LocalBindSocketPath": "str",
        "LocalBindSocketMode": "str",
        "Config": "raw",
        "MeshGateway": MESH_GATEWAY,
        "CentrallyConfigured": "bool",
    },
)

PROXY = Schema(
    "ConnectProxyConfig",
    {
        "DestinationServiceName": "str",
        "DestinationServiceID": "str",
        "LocalServiceAddress": "str",
        "LocalServicePort": "int",
        "LocalServiceSocketPath": "str",
        "Mode": "str",
        "TransparentProxy": "raw",
        "Config": "raw",
        "Upstreams": ListOf(UPSTREAM),
        "MeshGateway": MESH_GATEWAY,
        "Expose": "raw",
    },
)

WEIGHTS = Schema("Weights", {"Passing": "int", "Warning": "int"})

# Consul's `structs.ServiceAddress`: `{"lan": {"address": ..., "port": ...}}` comes back as
# `{"lan": {"Address": ..., "Port": ...}}`.
SERVICE_ADDRESS = Schema("ServiceAddress", {"Address": "str", "Port": "int"})

# A sidecar service is itself a service definition, so the schema refers to itself: the
# field dict is filled in after both schemas exist.
_service_fields: dict[str, Kind] = {}
SERVICE = Schema("ServiceDefinition", _service_fields, aliases={"Service": "Name"})
CONNECT = Schema(
    "ServiceConnect",
    {"Native": "bool", "SidecarService": SERVICE, "Proxy": "raw"},
)
_service_fields.update(
    {
        "Kind": "str",
        "ID": "str",
        "Name": "str",
        "Tags": ListOf("str"),
        "Address": "str",
        "TaggedAddresses": MapOf(SERVICE_ADDRESS),
        "Meta": "strmap",
        "Port": "int",
        "SocketPath": "str",
        "Weights": WEIGHTS,
        "EnableTagOverride": "bool",
        "Check": CHECK,
        "Checks": ListOf(CHECK),
        "Token": "str",
        "Proxy": PROXY,
        "Connect": CONNECT,
        "Namespace": "str",
        "Partition": "str",
        "Locality": "raw",
    }
)

INTENTION_SOURCE = Schema(
    "SourceIntention",
    {
        "Name": "str",
        "Peer": "str",
        "Namespace": "str",
        "Partition": "str",
        "SamenessGroup": "str",
        "Action": "str",
        "Permissions": ListOf("any"),
        "Precedence": "int",
        "Type": "str",
        "Description": "str",
        "LegacyID": "str",
        "LegacyMeta": "strmap",
        "LegacyCreateTime": "any",
        "LegacyUpdateTime": "any",
    },
)

CONFIG_ENTRY = Schema(
    "ConfigEntry",
    {
        "Kind": "str",
        "Name": "str",
        "Namespace": "str",
        "Partition": "str",
        "Meta": "strmap",
        "Sources": ListOf(INTENTION_SOURCE),
        "JWT": "raw",
    },
)

EXPORTED_CONSUMER = Schema(
    "ServiceConsumer",
    {"Peer": "str", "PeerName": "str", "Partition": "str", "SamenessGroup": "str"},
)

EXPORTED_SERVICE = Schema(
    "ExportedService",
    {"Name": "str", "Namespace": "str", "Consumers": ListOf(EXPORTED_CONSUMER)},
)

EXPORTED_SERVICES = Schema(
    "ExportedServicesConfigEntry",
    {
        "Kind": "str",
        "Name": "str",
        "Partition": "str",
        "Meta": "strmap",
        "Services": ListOf(EXPORTED_SERVICE),
    },
)

INTENTION = Schema(
    "Intention",
    {
        "ID": "str",
        "Description": "str",
        "SourceNS": "str",
        "SourceName": "str",
        "SourcePartition": "str",
        "SourcePeer": "str",
        "DestinationNS": "str",
        "DestinationName": "str",
        "DestinationPartition": "str",
        "SourceType": "str",
        "Action": "str",
        "Permissions": ListOf("any"),
        "Meta": "strmap",
        "Precedence": "int",
    },
)

QUERY_SERVICE = Schema(
    "ServiceQuery",
    {
        "Service": "str",
        "Namespace": "str",
        "Partition": "str",
        "Failover": "raw",
        "OnlyPassing": "bool",
        "IgnoreCheckIDs": ListOf("str"),
        "Near": "str",
        "Tags": ListOf("str"),
        "NodeMeta": "strmap",
        "ServiceMeta": "strmap",
        "Connect": "bool",
        "Peer": "str",
    },
)

PREPARED_QUERY = Schema(
    "PreparedQuery",
    {
        "ID": "str",
        "Name": "str",
        "Session": "str",
        "Token": "str",
        "Template": Schema(
            "QueryTemplateOptions", {"Type": "str", "Regexp": "str", "RemoveEmptyTags": "bool"}
        ),
        "Service": QUERY_SERVICE,
        "DNS": Schema("QueryDNSOptions", {"TTL": "str"}),
    },
)

ACL_TOKEN = Schema(
    "ACLToken",
    {
        "AccessorID": "str",
        "SecretID": "str",
        "Description": "str",
        "Policies": ListOf(Schema("ACLTokenPolicyLink", {"ID": "str", "Name": "str"})),
        "ServiceIdentities": ListOf(
            Schema("ACLServiceIdentity", {"ServiceName": "str", "Datacenters": ListOf("str")})
        ),
        "NodeIdentities": ListOf(
            Schema("ACLNodeIdentity", {"NodeName": "str", "Datacenter": "str"})
        ),
        "Local": "bool",
    },
)

ACL_POLICY = Schema(
    "ACLPolicy",
    {
        "ID": "str",
        "Name": "str",
        "Description": "str",
        "Rules": "str",
        "Datacenters": ListOf("str"),
    },
)

AUTHORIZE = Schema(
    "ConnectAuthorizeRequest",
    {"Target": "str", "ClientCertURI": "str", "ClientCertSerial": "str"},
)

CA_CONFIG = Schema(
    "CAConfiguration",
    {"Provider": "str", "Config": "raw", "ForceWithoutCrossSigning": "bool"},
)


SERVICE_CHECK = Schema("ServiceCheck", {"ID": "str", "Namespace": "str"})

SESSION = Schema(
    "Session",
    {
        "ID": "str",
        "Name": "str",
        "Node": "str",
        "LockDelay": "any",
        "Behavior": "str",
        "TTL": "str",
        "NodeChecks": ListOf("str"),
        "ServiceChecks": ListOf(SERVICE_CHECK),
        "Checks": ListOf("str"),
    },
)
