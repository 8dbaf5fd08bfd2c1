{{/*
Names and labels.
*/}}
{{- define "agiproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: RELEASE-agiproxy, or RELEASE when it already contains the chart
name. Truncated to 54 characters so that "-headless" still fits in 63.
*/}}
{{- define "agiproxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "agiproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agiproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agiproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agiproxy.labels" -}}
helm.sh/chart: {{ include "agiproxy.chart" . }}
{{ include "agiproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The headless Service: one record per ready replica, SRV per named port. */}}
{{- define "agiproxy.headlessName" -}}
{{- printf "%s-headless" (include "agiproxy.fullname" .) }}
{{- end }}

{{- define "agiproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agiproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is given (it pins the image), else repository:tag. */}}
{{- define "agiproxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := .Values.image.tag }}
{{- /* A number (--set image.tag=20240101 gives an int64, a values file's
20240101 a float64): its digits; the schema refuses non-integer numbers. */}}
{{- if kindIs "float64" $tag }}{{ $tag = printf "%.0f" $tag }}{{ end }}
{{- if kindIs "invalid" $tag }}{{ $tag = "" }}{{ end }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString $tag)) }}
{{- end }}
{{- end }}

{{/* The fewest replicas that run: autoscaling.minReplicas under an HPA, else replicaCount. */}}
{{- define "agiproxy.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/* The Secret holding the control token, and the key in it. */}}
{{- define "agiproxy.tokenSecretName" -}}
{{- if .Values.controlToken.existingSecret }}
{{- .Values.controlToken.existingSecret }}
{{- else }}
{{- printf "%s-control-token" (include "agiproxy.fullname" .) }}
{{- end }}
{{- end }}

{{- define "agiproxy.tokenSecretKey" -}}
{{- if .Values.controlToken.existingSecret }}
{{- default "token" .Values.controlToken.existingSecretKey }}
{{- else }}
{{- "token" }}
{{- end }}
{{- end }}

{{/* Where the pod finds its files. */}}
{{- define "agiproxy.configDir" -}}/etc/agiproxy{{- end }}
{{- define "agiproxy.configFile" -}}/etc/agiproxy/agiproxy.yaml{{- end }}
{{- define "agiproxy.tokenDir" -}}/etc/agiproxy-token{{- end }}
{{- define "agiproxy.tokenFile" -}}/etc/agiproxy-token/token{{- end }}

{{/*
An "ip:port" address taken apart (as YAML; callers fromYaml it): host (without
brackets and zone, lower case), port (a string), family ("4", "6", or "name"
for anything else, e.g. localhost) and ip, the address in one spelling per
address: IPv4 as written, IPv6 as eight hex groups without leading zeros
("::1", "0:0:0:0:0:0:0:1", "[0000::1]" and "::0.0.0.1" all give
0:0:0:0:0:0:0:1; "::ffff:127.0.0.1" gives 0:0:0:0:0:ffff:7f00:1). Called with
the address.
*/}}
{{- define "agiproxy.parseAddress" -}}
{{- $text := toString . | trim | lower }}
{{- $host := $text }}
{{- $port := "" }}
{{- if regexMatch "^(\\[[^\\]]*\\]|[^:]*):[^:]*$" $text }}
{{- $host = regexReplaceAll ":[^:]*$" $text "" }}
{{- $port = regexReplaceAll "^.*:" $text "" }}
{{- end }}
{{- $host = regexReplaceAll "%.*$" ($host | trimPrefix "[" | trimSuffix "]") "" }}
{{- $family := "name" }}
{{- $ip := $host }}
{{- if regexMatch "^[0-9]+(\\.[0-9]+){3}$" $host }}
{{- $family = "4" }}
{{- else if contains ":" $host }}
{{- $family = "6" }}
{{- $v6 := $host }}
{{- /* A trailing dotted quad (::ffff:127.0.0.1) becomes two hex groups. */}}
{{- if regexMatch ":[0-9]+(\\.[0-9]+){3}$" $v6 }}
{{- $quad := regexFind "[0-9]+(\\.[0-9]+){3}$" $v6 }}
{{- $b := splitList "." $quad }}
{{- $v6 = printf "%s%x:%x" (trimSuffix $quad $v6) (add (mul (atoi (index $b 0)) 256) (atoi (index $b 1))) (add (mul (atoi (index $b 2)) 256) (atoi (index $b 3))) }}
{{- end }}
{{- $groups := list }}
{{- if contains "::" $v6 }}
{{- $halves := splitList "::" $v6 }}
{{- $left := list }}
{{- $right := list }}
{{- if ne (index $halves 0) "" }}{{ $left = splitList ":" (index $halves 0) }}{{ end }}
{{- if and (eq (len $halves) 2) (ne (index $halves 1) "") }}{{ $right = splitList ":" (index $halves 1) }}{{ end }}
{{- $groups = $left }}
{{- range until (max 0 (sub 8 (add (len $left) (len $right))) | int) }}
{{- $groups = append $groups "0" }}
{{- end }}
{{- $groups = concat $groups $right }}
{{- else }}
{{- $groups = splitList ":" $v6 }}
{{- end }}
{{- $clean := list }}
{{- range $groups }}
{{- $clean = append $clean (regexReplaceAll "^0+" . "" | default "0") }}
{{- end }}
{{- $ip = join ":" $clean }}
{{- end }}
{{- toYaml (dict "host" $host "port" $port "family" $family "ip" $ip) }}
{{- end }}

{{/*
"true" when an "ip:port" address is on loopback (nothing outside the pod
reaches it): 127.0.0.0/8, ::1 in any spelling, IPv4-mapped ::ffff:127.x.y.z,
localhost. Empty otherwise. Called with the address.
*/}}
{{- define "agiproxy.isLoopback" -}}
{{- $a := include "agiproxy.parseAddress" . | fromYaml }}
{{- if eq $a.family "4" }}
{{- if hasPrefix "127." $a.ip }}true{{ end }}
{{- else if eq $a.family "6" }}
{{- if or (eq $a.ip "0:0:0:0:0:0:0:1") (regexMatch "^0:0:0:0:0:ffff:7f[0-9a-f]{2}:" $a.ip) }}true{{ end }}
{{- else if or (eq (trimSuffix "." $a.host) "localhost") (hasSuffix ".localhost" (trimSuffix "." $a.host)) }}true
{{- end }}
{{- end }}

{{/*
An "ip:port" address as a socket binds it (as YAML; callers fromYaml it):
family ("4", "6", or "name" for anything else), key (the IP in one spelling
across both families, IPv4's the mapped one parseAddress gives
[::ffff:a.b.c.d]: 0:0:0:0:0:ffff:a00:1 for 10.0.0.1), port (a string, "0"
when missing) and any (true for the family's wildcard: 0.0.0.0, or [::]
itself). Called with a list: the address, and whether it is taken as the
binary takes the control API's (config's control_takes, to_canonical): then
an IPv4-mapped [::ffff:a.b.c.d] is the IPv4 address a.b.c.d, and
[::ffff:0.0.0.0] IPv4's wildcard. A listener's mapped address is left IPv6,
not the wildcard (binds_clash).
*/}}
{{- define "agiproxy.bindAddress" -}}
{{- $a := include "agiproxy.parseAddress" (index . 0) | fromYaml }}
{{- $mapped := "0:0:0:0:0:ffff:" }}
{{- $family := $a.family }}
{{- $key := $a.ip }}
{{- if eq $a.family "4" }}
{{- $key = (include "agiproxy.parseAddress" (printf "[::ffff:%s]:0" $a.ip) | fromYaml).ip }}
{{- else if and (eq $a.family "6") (index . 1) (hasPrefix $mapped $a.ip) }}
{{- $family = "4" }}
{{- end }}
{{- $any := or (and (eq $family "4") (eq $key (printf "%s0:0" $mapped))) (and (eq $family "6") (eq $key "0:0:0:0:0:0:0:0")) }}
{{- toYaml (dict "family" $family "key" $key "port" (printf "%d" (atoi $a.port)) "any" $any) }}
{{- end }}

{{/*
"true" when two addresses (bindAddress's) cannot both be bound, as config's
binds_clash: the same port (not 0, which picks a free one each time), the
same family, and the same IP or a wildcard of that family. A listener's [::]
is IPv6 only: [::]:4573 beside 0.0.0.0:4573 is fine. Empty otherwise.
Called with a list of the two.
*/}}
{{- define "agiproxy.bindsClash" -}}
{{- $a := index . 0 }}
{{- $b := index . 1 }}
{{- if and (ne $a.port "0") (eq $a.port $b.port) (eq $a.family $b.family) (has $a.family (list "4" "6")) }}
{{- if or (eq $a.key $b.key) $a.any $b.any }}true{{ end }}
{{- end }}
{{- end }}

{{/*
"true" when the control API's address and a listener's cannot both be bound,
as config's control_takes: the control address taken as the binary takes it
(bindAddress: [::ffff:a.b.c.d] is a.b.c.d), then binds_clash; and the control
API's [::] (bound without IPV6_V6ONLY) takes the port on IPv4 too. Empty
otherwise. Called with a list: the control address, the listener address.
*/}}
{{- define "agiproxy.controlClashes" -}}
{{- $c := include "agiproxy.bindAddress" (list (index . 0) true) | fromYaml }}
{{- $l := include "agiproxy.bindAddress" (list (index . 1) false) | fromYaml }}
{{- if include "agiproxy.bindsClash" (list $c $l) }}true
{{- else if and (eq $c.family "6") $c.any (ne $c.port "0") (eq $c.port $l.port) (has $l.family (list "4" "6")) }}true
{{- end }}
{{- end }}

{{/*
The control API's default host: 0.0.0.0, or [::] when ipFamilies has IPv6
(the control API binds [::] without IPV6_V6ONLY, so it answers on IPv4 too).
*/}}
{{- define "agiproxy.anyAddress" -}}
{{- if has "IPv6" (.Values.ipFamilies | default list) }}[::]{{ else }}0.0.0.0{{ end }}
{{- end }}

{{/*
The listeners the chart writes when ipFamilies is set and config.listeners
is left at the chart's default: one wildcard listener on ports.agi per family
(a listener's [::] is IPv6 only). As YAML (a list under "listeners").
*/}}
{{- define "agiproxy.familyListeners" -}}
{{- $families := .Values.ipFamilies | default list }}
{{- $listeners := list }}
{{- range $families }}
{{- if eq . "IPv4" }}
{{- $listeners = append $listeners (dict "name" "asterisk" "address" (printf "0.0.0.0:%v" $.Values.ports.agi)) }}
{{- else }}
{{- $listeners = append $listeners (dict "name" (ternary "asterisk-v6" "asterisk" (has "IPv4" $families)) "address" (printf "[::]:%v" $.Values.ports.agi)) }}
{{- end }}
{{- end }}
{{- toYaml (dict "listeners" $listeners) }}
{{- end }}

{{/*
The control block agiproxy gets: the chart's default (listen on the pod's
address, read the token from the mounted Secret), with the keys of
.Values.config.control over it. token_env given there replaces token_file.
*/}}
{{- define "agiproxy.controlDict" -}}
{{- $control := dict "address" (printf "%s:%v" (include "agiproxy.anyAddress" .) .Values.ports.control) "token_file" (include "agiproxy.tokenFile" .) }}
{{- $user := dict }}
{{- if and (kindIs "map" .Values.config) (kindIs "map" .Values.config.control) }}
{{- $user = deepCopy .Values.config.control }}
{{- end }}
{{- if hasKey $user "token_env" }}
{{- $_ := unset $control "token_file" }}
{{- end }}
{{- toYaml (mergeOverwrite $control $user) }}
{{- end }}

{{/*
The directory of config.control.socket, where the pod mounts a small
writable emptyDir (the root filesystem is read-only, and the image has no
/run or /tmp); empty without a socket. Fails on a directory that cannot take
that mount: / itself, or one of the chart's mounts (the config, the token,
extraVolumeMounts such as TLS files), inside one, or above one.
*/}}
{{- define "agiproxy.controlSocketDir" -}}
{{- $control := include "agiproxy.controlDict" . | fromYaml }}
{{- if $control.socket }}
{{- $socket := toString $control.socket }}
{{- $dir := dir $socket }}
{{- if or (eq $dir "/") (eq $dir ".") }}
{{- fail (printf "config.control.socket %s is directly under /: the root filesystem is read-only, and the chart mounts a writable directory for the socket at its parent; put it in a directory of its own, e.g. /run/agiproxy/control.sock" $socket) }}
{{- end }}
{{- $mounts := list (include "agiproxy.configDir" .) (include "agiproxy.tokenDir" .) }}
{{- range .Values.extraVolumeMounts }}
{{- if and (kindIs "map" .) .mountPath }}
{{- $mounts = append $mounts (clean (toString .mountPath)) }}
{{- end }}
{{- end }}
{{- range $mounts }}
{{- if or (eq $dir .) (hasPrefix (printf "%s/" .) $dir) (hasPrefix (printf "%s/" $dir) .) (eq . "/") }}
{{- fail (printf "config.control.socket %s: the chart mounts a writable emptyDir at the socket's directory %s, which would clash with the pod's read-only mount at %s (the config, the token Secret or extraVolumeMounts: the same directory, one inside it or one above it); put it in a directory of its own, e.g. /run/agiproxy/control.sock" $socket $dir .) }}
{{- end }}
{{- end }}
{{- $dir }}
{{- end }}
{{- end }}

{{/*
The whole config as a dict (as YAML; callers fromYaml it): .Values.config with
the control block above. Fails the render on a config the pod cannot run with
the chart's ports and probes.
*/}}
{{- define "agiproxy.configDict" -}}
{{- if not (kindIs "map" .Values.config) }}
{{- fail "config must be a YAML object: agiproxy's config file (docs/configuration.md)" }}
{{- end }}
{{- $cfg := deepCopy .Values.config }}
{{- $families := .Values.ipFamilies | default list }}
{{- /* ipFamilies picks the listeners while config.listeners is the chart's default. */}}
{{- $defaultListeners := list (dict "name" "asterisk" "address" "0.0.0.0:4573") }}
{{- if and $families (eq (toYaml $cfg.listeners) (toYaml $defaultListeners)) }}
{{- $_ := set $cfg "listeners" (include "agiproxy.familyListeners" . | fromYaml).listeners }}
{{- end }}
{{- $control := include "agiproxy.controlDict" . | fromYaml }}
{{- $_ := set $cfg "control" $control }}
{{- /* The probes, the headless Service and Prometheus need the control API on the pod's address. */}}
{{- if and (hasKey $control "enabled") (not $control.enabled) }}
{{- fail "config.control.enabled is false, but the liveness and readiness probes use the control API (/healthz, /readyz): keep it enabled" }}
{{- end }}
{{- if eq (int .Values.ports.control) (int .Values.ports.agi) }}
{{- fail (printf "ports.control and ports.agi are both %v: the control API and the FastAGI listener cannot listen on one port, and the pods would not start; give ports.control another port (9090 is the chart's default)" .Values.ports.agi) }}
{{- end }}
{{- $address := toString $control.address }}
{{- if not (hasSuffix (printf ":%v" .Values.ports.control) $address) }}
{{- fail (printf "config.control.address %s does not use ports.control (%v): set both to the same port" $address .Values.ports.control) }}
{{- end }}
{{- if include "agiproxy.isLoopback" $address }}
{{- fail (printf "config.control.address %s is loopback: the kubelet's probes and Prometheus could not reach it; listen on 0.0.0.0 or [::] (the chart's default, by ipFamilies) and keep the token" $address) }}
{{- end }}
{{- /* An IPv4-mapped [::ffff:a.b.c.d] binds IPv4 only, as a.b.c.d (config's control_takes). */}}
{{- $controlAt := include "agiproxy.bindAddress" (list $address true) | fromYaml }}
{{- if and (has "IPv6" $families) (eq $controlAt.family "4") }}
{{- fail (printf "config.control.address %s is IPv4%s, but ipFamilies has IPv6: the kubelet probes an IPv6-only pod on its IPv6 address, and a dual-stack headless Service gives ctl IPv6 addresses too; listen on [::]:%v (the chart's default with IPv6; it answers IPv4 too)" $address (ternary " (IPv4-mapped: agiproxy binds it as IPv4 only)" "" (eq (include "agiproxy.parseAddress" $address | fromYaml).family "6")) .Values.ports.control) }}
{{- end }}
{{- $_ := include "agiproxy.controlSocketDir" . }}
{{- if and (kindIs "map" $control.tls) $control.tls.client_ca }}
{{- fail "config.control.tls.client_ca requires client certificates on every endpoint, /healthz and /readyz included, so the kubelet's httpGet probes cannot pass: drop client_ca (the bearer token still guards /v1)" }}
{{- end }}
{{- /* One listener must use ports.agi: the Services send Asterisk there. */}}
{{- $agiSuffix := printf ":%v" .Values.ports.agi }}
{{- $found := false }}
{{- $agiFamilies := list }}
{{- $bound := list }}
{{- if hasKey $cfg "listeners" }}
{{- range $index, $listener := $cfg.listeners }}
{{- if kindIs "map" $listener }}
{{- /* Two listeners on one port, the same IP or a wildcard of the family: the second cannot bind (config's binds_clash). */}}
{{- $at := include "agiproxy.bindAddress" (list (toString $listener.address) false) | fromYaml }}
{{- range $bound }}
{{- if include "agiproxy.bindsClash" (list .at $at) }}
{{- fail (printf "config.listeners[%d] (%v) address %v and config.listeners[%d] (%v) address %v want the same port: agiproxy could not listen on both, and the pods would not start; give one of them another port, or drop one (0.0.0.0 already takes the port on every IPv4 address of the pod, [::] on every IPv6 one)" .index .name .address $index $listener.name $listener.address) }}
{{- end }}
{{- end }}
{{- $bound = append $bound (dict "index" $index "name" $listener.name "address" $listener.address "at" $at) }}
{{- /* A loopback listener binds and the pod turns ready, but no call from outside the pod reaches it. */}}
{{- if include "agiproxy.isLoopback" (toString $listener.address) }}
{{- fail (printf "config.listeners[%d] (%v) address %v is loopback: the pod turns ready, but Asterisk, through the Services, could not reach it and every call would be refused; listen on 0.0.0.0%s (and [::]%s for IPv6)" $index $listener.name $listener.address $agiSuffix $agiSuffix) }}
{{- end }}
{{- /* Listeners bind IPv6 only, where Linux refuses an IPv4-mapped address (config refuses it too). */}}
{{- if and (eq $at.family "6") (hasPrefix "0:0:0:0:0:ffff:" $at.key) }}
{{- $v4 := regexReplaceAll "(?i)^\\[(?:0*:)*ffff:([0-9.]+)\\](:[0-9]+)$" (toString $listener.address) "${1}${2}" }}
{{- fail (printf "config.listeners[%d] (%v) address %v is an IPv4-mapped IPv6 address, which a listener cannot bind (it listens IPv6 only): the pods would not start; write it as IPv4%s" $index $listener.name $listener.address (ternary (printf ", %s" $v4) "" (ne $v4 (toString $listener.address)))) }}
{{- end }}
{{- if include "agiproxy.controlClashes" (list $address (toString $listener.address)) }}
{{- fail (printf "config.control.address %s and config.listeners[%d] (%v) address %v want the same port: agiproxy could not listen on both, and the pods would not start; move that listener to another port" $address $index $listener.name $listener.address) }}
{{- end }}
{{- if hasSuffix $agiSuffix (toString $listener.address) }}
{{- $found = true }}
{{- $agiFamilies = append $agiFamilies (include "agiproxy.parseAddress" (toString $listener.address) | fromYaml).family }}
{{- end }}
{{- end }}
{{- end }}
{{- else if eq (int .Values.ports.agi) 4573 }}
{{- $found = true }}
{{- $agiFamilies = list "4" }}
{{- end }}
{{- if not $found }}
{{- fail (printf "no listener in config.listeners uses ports.agi (%v): the Services send Asterisk to that port; add a listener on 0.0.0.0%s (or [::]%s for IPv6) or change ports.agi" .Values.ports.agi $agiSuffix $agiSuffix) }}
{{- end }}
{{- /* The Services send Asterisk to the pod's address of every family they have. */}}
{{- range $families }}
{{- $family := trimPrefix "IPv" . }}
{{- if not (has $family $agiFamilies) }}
{{- fail (printf "ipFamilies has %s, but no listener in config.listeners on ports.agi (%v) is %s: Asterisk's calls over %s would be refused; add a listener on %s%s" . $.Values.ports.agi . . (ternary "0.0.0.0" "[::]" (eq $family "4")) $agiSuffix) }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The ConfigMap's name: the full name and 8 hex digits of a hash, so that the
pods of each revision keep the ConfigMap they started with whenever a change
must not reach them in place. With rollOnConfigChange, the hash of the whole
config: every change is a new ConfigMap and a rollout, and old pods never
hot-reload it. Otherwise the hash of what must not change under a running
pod: the listeners' addresses, sorted (a listener moved or removed would
close the port the Services still send calls to, while the pod is Ready;
the chart cannot tell an added listener from a moved one, so an added
address rolls too), ports.agi, and control (read at start only). A
listener's other fields (name, proxy_protocol) and the rest of the config
change in place.
*/}}
{{- define "agiproxy.configMapName" -}}
{{- $text := include "agiproxy.configYaml" . }}
{{- if not .Values.rollOnConfigChange }}
{{- $cfg := $text | fromYaml }}
{{- $addresses := list }}
{{- range $cfg.listeners }}
{{- if kindIs "map" . }}{{ $addresses = append $addresses (toString .address) }}{{ end }}
{{- end }}
{{- $text = toYaml (dict "listeners" ($addresses | sortAlpha | uniq) "control" $cfg.control "agi" (toString .Values.ports.agi)) }}
{{- end }}
{{- printf "%s-%s" (include "agiproxy.fullname" .) ($text | sha256sum | trunc 8) }}
{{- end }}

{{/* The config file's text. */}}
{{- define "agiproxy.configYaml" -}}
{{- include "agiproxy.configDict" . }}
{{- end }}

{{/*
Seconds in an agiproxy duration string, rounded up: humantime's syntax as
`agiproxy check` takes it, numbers (a fraction allowed) each followed by a
unit, spaces between them optional ("5m", "300s", "1h 30m", "1h30m", "1.5s",
"90mins", "2hrs", "300000millis"). The units, case as written: nsec ns nanos;
usec us µs; msec ms millis; seconds second secs sec s; minutes minute mins
min m; hours hour hrs hr h; days day d; weeks week w; months month M (30.44
days); years year y (365.25 days). Called with a list: the string, and the
value's name for messages.
*/}}
{{- define "agiproxy.durationSeconds" -}}
{{- $what := index . 1 }}
{{- $text := toString (index . 0) | replace " " "" }}
{{- $parts := regexFindAll "[0-9]+(\\.[0-9]+)?[a-zA-Zµ]+" $text -1 }}
{{- if or (not $parts) (ne (join "" $parts) $text) }}
{{- fail (printf "%s %q: not a duration agiproxy understands (write e.g. 5m, 300s, 1h 30m)" $what $text) }}
{{- end }}
{{- $units := dict "nsec" 0.000000001 "ns" 0.000000001 "nanos" 0.000000001 "usec" 0.000001 "us" 0.000001 "µs" 0.000001 "msec" 0.001 "ms" 0.001 "millis" 0.001 "seconds" 1.0 "second" 1.0 "secs" 1.0 "sec" 1.0 "s" 1.0 "minutes" 60.0 "minute" 60.0 "mins" 60.0 "min" 60.0 "m" 60.0 "hours" 3600.0 "hour" 3600.0 "hrs" 3600.0 "hr" 3600.0 "h" 3600.0 "days" 86400.0 "day" 86400.0 "d" 86400.0 "weeks" 604800.0 "week" 604800.0 "w" 604800.0 "months" 2630016.0 "month" 2630016.0 "M" 2630016.0 "years" 31557600.0 "year" 31557600.0 "y" 31557600.0 }}
{{- $total := 0.0 }}
{{- range $parts }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" . }}
{{- $unit := trimPrefix $number . }}
{{- if not (hasKey $units $unit) }}
{{- fail (printf "%s %q: unknown unit %q (agiproxy takes ns, us, ms, s, m, h, d, w and their long spellings: millis, secs, mins, hrs, days, weeks...)" $what $text $unit) }}
{{- end }}
{{- $total = addf $total (mulf (float64 $number) (index $units $unit)) }}
{{- end }}
{{- ceil $total | int }}
{{- end }}

{{/*
"true" when the agi Service is a LoadBalancer or NodePort with
externalTrafficPolicy Local: the cloud load balancer health-checks each node
(kube-proxy's healthCheckNodePort) and needs 10-30 s (interval x unhealthy
threshold) to stop sending a node new connections. Empty otherwise.
*/}}
{{- define "agiproxy.externalLocal" -}}
{{- if and (has (default "ClusterIP" .Values.service.type) (list "LoadBalancer" "NodePort")) (eq (toString .Values.service.externalTrafficPolicy) "Local") }}true{{ end }}
{{- end }}

{{/*
Seconds a terminating replica keeps accepting calls before it drains, when
not given: 5 (kube-proxy on every node learning that the endpoint is gone),
30 behind an external load balancer with externalTrafficPolicy Local.
*/}}
{{- define "agiproxy.serveSeconds" -}}
{{- if include "agiproxy.externalLocal" . }}30{{ else }}5{{ end }}
{{- end }}

{{/* preStop.sleepSeconds: "" is serveSeconds. */}}
{{- define "agiproxy.preStopSleep" -}}
{{- $v := .Values.preStop.sleepSeconds }}
{{- if or (kindIs "invalid" $v) (eq (toString $v) "") }}{{ include "agiproxy.serveSeconds" . }}{{ else }}{{ int $v }}{{ end }}
{{- end }}

{{/*
The preStop hook: sleep (Kubernetes' built-in action), exec (`sleep` in the
container) or none. auto is sleep on clusters >= 1.30, none before; a sleep
of 0 seconds is no hook (API servers before 1.33 refuse `sleep: {seconds: 0}`).
*/}}
{{- define "agiproxy.preStopMode" -}}
{{- $mode := default "auto" .Values.preStop.mode }}
{{- if not (has $mode (list "auto" "sleep" "exec" "none")) }}
{{- fail (printf "preStop.mode %q: use auto, sleep, exec or none" $mode) }}
{{- end }}
{{- if eq (include "agiproxy.preStopSleep" . | int) 0 }}none
{{- else if eq $mode "auto" }}
{{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}sleep{{ else }}none{{ end }}
{{- else }}
{{- $mode }}
{{- end }}
{{- end }}

{{/* Seconds the preStop hook keeps the replica serving before SIGTERM (0 without one). */}}
{{- define "agiproxy.preStopSeconds" -}}
{{- if eq (include "agiproxy.preStopMode" .) "none" }}0{{ else }}{{ include "agiproxy.preStopSleep" . }}{{ end }}
{{- end }}

{{/*
--shutdown-delay: seconds agiproxy keeps accepting after SIGTERM (/readyz
answering 503 at once) before it drains. shutdownDelaySeconds "": when no
preStop sleep is rendered (Kubernetes < 1.30 with preStop.mode auto, mode
none, or a sleep of 0), serveSeconds (5, or 30 behind an external load
balancer with externalTrafficPolicy Local); else 0.
*/}}
{{- define "agiproxy.shutdownDelay" -}}
{{- $v := .Values.shutdownDelaySeconds }}
{{- if and (not (kindIs "invalid" $v)) (ne (toString $v) "") }}{{ int $v }}
{{- else if eq (include "agiproxy.preStopSeconds" . | int) 0 }}{{ include "agiproxy.serveSeconds" . }}
{{- else }}0
{{- end }}
{{- end }}

{{/* Seconds of config.timeouts.drain (5m when absent): --max-drain, and the grace period. */}}
{{- define "agiproxy.drainSeconds" -}}
{{- $drain := "5m" }}
{{- if and (kindIs "map" .Values.config) (kindIs "map" .Values.config.timeouts) .Values.config.timeouts.drain }}
{{- $drain = .Values.config.timeouts.drain }}
{{- end }}
{{- include "agiproxy.durationSeconds" (list $drain "config.timeouts.drain") }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, the shutdown delay, the
drain (config.timeouts.drain, which the pods also get as --max-drain, so a
longer drain hot-reloaded later cannot outlast it), then a margin, so SIGKILL
never cuts a drain short. An explicit value must cover the same with at
least 5 s to spare (agiproxy cuts the last calls at the drain deadline,
telling Asterisk FAILURE, and exits).
*/}}
{{- define "agiproxy.terminationGrace" -}}
{{- $preStop := include "agiproxy.preStopSeconds" . | int }}
{{- $delay := include "agiproxy.shutdownDelay" . | int }}
{{- $drain := include "agiproxy.drainSeconds" . | int }}
{{- /* null (~) is unset, as "": the margin's default, the derived grace period. */}}
{{- $margin := .Values.terminationGraceMarginSeconds }}
{{- if or (kindIs "invalid" $margin) (eq (toString $margin) "") }}{{ $margin = 30 }}{{ end }}
{{- $derived := add $preStop $delay $drain (int $margin) }}
{{- $grace := $derived }}
{{- $given := .Values.terminationGracePeriodSeconds }}
{{- if and (not (kindIs "invalid" $given)) (ne (toString $given) "") }}
{{- $grace = int $given }}
{{- end }}
{{- if ge $preStop $grace }}
{{- fail (printf "preStop.sleepSeconds %d is not shorter than terminationGracePeriodSeconds %d: the API server refuses the hook (and the drain would get no time); lower the sleep, or leave terminationGracePeriodSeconds empty (the chart derives it)" $preStop $grace) }}
{{- end }}
{{- $needed := add $preStop $delay $drain 5 }}
{{- if lt $grace $needed }}
{{- fail (printf "terminationGracePeriodSeconds %d is shorter than the preStop sleep (%ds) + shutdownDelaySeconds (%ds) + config.timeouts.drain (%ds) + 5 s for agiproxy to cut the last calls: the kubelet would SIGKILL a drain, cutting calls with no FAILURE told; set it to at least %d, or leave it empty (the chart then derives %d, with terminationGraceMarginSeconds)" $grace $preStop $delay $drain $needed $derived) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/* http or https for the control API, from config.control.tls. */}}
{{- define "agiproxy.controlScheme" -}}
{{- $control := include "agiproxy.controlDict" . | fromYaml }}
{{- if kindIs "map" $control.tls }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* Label matchers selecting this release's series in alert rules. */}}
{{- define "agiproxy.ruleSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "job=%q,namespace=%q" (include "agiproxy.headlessName" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
A Kubernetes quantity (100m, 384Mi, 1.5Gi, 268435456, 1e9) as a plain
number (printed with %f), or empty when it cannot be read. Called with the
quantity.
*/}}
{{- define "agiproxy.quantity" -}}
{{- $q := toString . | trim }}
{{- $number := regexFind "^([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" $q }}
{{- $suffix := trimPrefix $number $q }}
{{- $scale := dict "" 1.0 "n" 0.000000001 "u" 0.000001 "m" 0.001 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0 "T" 1000000000000.0 "P" 1000000000000000.0 "E" 1000000000000000000.0 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- if and $number (hasKey $scale $suffix) }}
{{- printf "%f" (mulf (float64 $number) (index $scale $suffix)) }}
{{- else if and $number (regexMatch "^[eE][+-]?[0-9]+$" $suffix) }}
{{- $exp := atoi (trimPrefix "+" (substr 1 -1 $suffix)) }}
{{- $value := float64 $number }}
{{- range until (int (ternary (sub 0 $exp) $exp (lt $exp 0))) }}
{{- $value = ternary (divf $value 10) (mulf $value 10) (lt $exp 0) }}
{{- end }}
{{- printf "%f" $value }}
{{- end }}
{{- end }}

{{/*
A container's resources with no request above its limit (the API server
refuses such a pod). A request left at the chart's default (values.yaml:
keep the defaults below in step) is lowered to the limit: a values file
written for an older chart, with a lower limit than today's default request
(e.g. limits.memory 256Mi, the request now defaulting to 384Mi), still
renders. A request given above its limit fails the render. As YAML; called
with a list: the resources, the chart's default requests (a dict), and the
value's name for messages.
*/}}
{{- define "agiproxy.resources" -}}
{{- $r := deepCopy (index . 0 | default dict) }}
{{- $defaults := index . 1 }}
{{- $what := index . 2 }}
{{- if and (kindIs "map" $r.requests) (kindIs "map" $r.limits) }}
{{- range $name, $limit := $r.limits }}
{{- if hasKey $r.requests $name }}
{{- $request := index $r.requests $name }}
{{- $rq := include "agiproxy.quantity" $request }}
{{- $lq := include "agiproxy.quantity" $limit }}
{{- if and $rq $lq (gt (float64 $rq) (float64 $lq)) }}
{{- if eq (toString $request) (toString (get $defaults $name)) }}
{{- $_ := set $r.requests $name $limit }}
{{- else }}
{{- fail (printf "%s.requests.%s %v is above %s.limits.%s %v: the API server refuses a container whose request exceeds its limit; lower the request or raise the limit" $what $name $request $what $name $limit) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if $r }}{{ toYaml $r }}{{ end }}
{{- end }}

{{/* The agiproxy container's resources (the chart's default requests: 100m, 384Mi). */}}
{{- define "agiproxy.podResources" -}}
{{- include "agiproxy.resources" (list .Values.resources (dict "cpu" "100m" "memory" "384Mi") "resources") }}
{{- end }}

{{/*
The config check Job's spec (templates/config-check.yaml). Its pod runs like
the Deployment's where that matters for it to be scheduled and pulled at
all: imagePullSecrets, the security contexts, nodeSelector, tolerations,
affinity.nodeAffinity (e.g. the nodes of the image's architecture),
priorityClassName, podAnnotations and podLabels (without the Deployment's
selector labels: no Service, PDB or monitor picks this pod), with
configCheck.podAnnotations and podLabels over them (by default Istio's and
Linkerd's sidecar injection off: an injected proxy never exits, and the
Job would run into activeDeadlineSeconds). Not the pod (anti-)affinity
terms, which are about the replicas. The service account: an existing one
(serviceAccount.create false) is used, so pull secrets attached to it
apply; the chart's own does not exist yet before install (hooks run before
the release's objects are made), so with create true the pod runs as the
namespace's default account, without a token (the chart's account carries
only annotations, which the check does not need). Called with a dict: ctx
(the root context) and name (the ConfigMap's).
*/}}
{{- define "agiproxy.configCheckJobSpec" -}}
{{- $ := .ctx }}
{{- $v := $.Values }}
{{- $selector := include "agiproxy.selectorLabels" $ | fromYaml }}
{{- $labels := dict }}
{{- range $key, $value := ($v.podLabels | default dict) }}
{{- if not (hasKey $selector $key) }}{{ $_ := set $labels $key $value }}{{ end }}
{{- end }}
{{- $labels = mergeOverwrite $labels (deepCopy ($v.configCheck.podLabels | default dict)) }}
{{- $_ := set $labels "app.kubernetes.io/name" (printf "%s-config-check" (include "agiproxy.name" $ | trunc 50 | trimSuffix "-")) }}
{{- $_ := set $labels "app.kubernetes.io/instance" $.Release.Name }}
{{- $_ := set $labels "app.kubernetes.io/component" "config-check" }}
{{- $annotations := mergeOverwrite (deepCopy ($v.podAnnotations | default dict)) (deepCopy ($v.configCheck.podAnnotations | default dict)) }}
backoffLimit: 0
activeDeadlineSeconds: {{ $v.configCheck.activeDeadlineSeconds }}
template:
  metadata:
    labels:
      {{- toYaml $labels | nindent 6 }}
    {{- with $annotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    restartPolicy: Never
    {{- if not $v.serviceAccount.create }}
    serviceAccountName: {{ include "agiproxy.serviceAccountName" $ }}
    {{- end }}
    automountServiceAccountToken: false
    enableServiceLinks: false
    {{- with $v.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.priorityClassName }}
    priorityClassName: {{ . }}
    {{- end }}
    {{- with $v.podSecurityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: check
        image: {{ include "agiproxy.image" $ | quote }}
        imagePullPolicy: {{ $v.image.pullPolicy }}
        command:
          - {{ $v.binary | quote }}
        args:
          - check
          - -c
          - {{ include "agiproxy.configFile" $ }}
        {{- with include "agiproxy.resources" (list $v.configCheck.resources (dict "cpu" "10m" "memory" "32Mi") "configCheck.resources") }}
        resources:
          {{- . | nindent 10 }}
        {{- end }}
        {{- with $v.securityContext }}
        securityContext:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        volumeMounts:
          - name: config
            mountPath: {{ include "agiproxy.configDir" $ }}
            readOnly: true
    volumes:
      - name: config
        configMap:
          name: {{ .name }}
    {{- if and (kindIs "map" $v.affinity) $v.affinity.nodeAffinity }}
    affinity:
      nodeAffinity:
        {{- toYaml $v.affinity.nodeAffinity | nindent 8 }}
    {{- end }}
    {{- with $v.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}

{{/*
The ConfigMaps (besides this revision's) that pods of the live Deployment
may still need to start: those mounted by the Deployment's current pod
template and by each of its ReplicaSets that still has replicas (read with
lookup on helm install/upgrade; none with helm template). A rollout still
going (or stalled after a failed `helm upgrade --wait`) keeps old
ReplicaSets, whose new pods (an HPA scale-up, an eviction's replacement)
mount their revision's ConfigMap: deleting it would leave them in
ContainerCreating. So templates/configmap.yaml renders these again, their
data copied as is, and Helm deletes each one only on the first upgrade
after no ReplicaSet with replicas uses it. As YAML: names, a list.
*/}}
{{- define "agiproxy.keptConfigMaps" -}}
{{- $full := include "agiproxy.fullname" . }}
{{- $current := include "agiproxy.configMapName" . }}
{{- $names := list }}
{{- $templates := list }}
{{- $deployment := lookup "apps/v1" "Deployment" .Release.Namespace $full }}
{{- if $deployment }}
{{- $templates = append $templates (dig "spec" "template" dict $deployment) }}
{{- $sets := lookup "apps/v1" "ReplicaSet" .Release.Namespace "" }}
{{- range (dig "items" list $sets) }}
{{- $owned := false }}
{{- range (dig "metadata" "ownerReferences" list .) }}
{{- if and (eq (toString .kind) "Deployment") (eq (toString .name) $full) }}{{ $owned = true }}{{ end }}
{{- end }}
{{- if and $owned (or (gt (int (dig "spec" "replicas" 0 .)) 0) (gt (int (dig "status" "replicas" 0 .)) 0)) }}
{{- $templates = append $templates (dig "spec" "template" dict .) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $templates }}
{{- range (dig "spec" "volumes" list .) }}
{{- if and (eq (toString .name) "config") (kindIs "map" .configMap) }}
{{- $n := toString .configMap.name }}
{{- if and (ne $n $current) (or (eq $n $full) (hasPrefix (printf "%s-" $full) $n)) (not (has $n $names)) }}
{{- $names = append $names $n }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml (dict "names" $names) }}
{{- end }}
