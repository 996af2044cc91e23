package Edge::FakeKube;

# A small Kubernetes API server for the tests, shaped after the API reference: discovery
# (/api, /api/v1, /apis, /apis/GROUP/VERSION, /version), lists (paged with limit and continue),
# watches (chunked JSON events from a resourceVersion, bookmarks, 410 Gone once compacted), one
# object by name (GET) and its JSON merge patch (PATCH, as `kubectl cordon` and `label` send),
# bearer tokens, TLS, and an "exporter" variant that answers every read with the whole list
# and an ETag. Objects carry what real ones carry (uid, managedFields, annotations, status).
#
# The state is a folder of files, so that the forked connection handlers and the test see the
# same: `log` (one line per change: rv, type, kind, JSON), `compacted` (the oldest rv a watch
# may start from), `mode` (ok, 500, garbage, hang, oversized, bigpages, slow, eventsize; with a
# second word, only for the paths that contain it: "500 ingresses") and `token`.
# Every request is appended to `requests` (method, target, with or without a token, TLS).
# kubectl (`get -o json`, `get --watch`, `proxy`) is the judge that this is faithful enough.

use strict;
use warnings;

use IO::Socket::INET;
use JSON::PP ();
# JSON::XS (Debian's libjson-xs-perl) where it is installed: the benchmark's lists are large.
my $JSON = eval { require JSON::XS; 'JSON::XS' } // 'JSON::PP';
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

my $json = $JSON->new->canonical;

my %KINDS = (
    ingresses      => { kind => 'Ingress',      group => 'networking.k8s.io',         version => 'v1' },
    ingressclasses => { kind => 'IngressClass', group => 'networking.k8s.io',         version => 'v1', cluster => 1 },
    httproutes     => { kind => 'HTTPRoute',    group => 'gateway.networking.k8s.io', version => 'v1' },
    tlsroutes      => { kind => 'TLSRoute',     group => 'gateway.networking.k8s.io', version => 'v1alpha2' },
    gateways       => { kind => 'Gateway',      group => 'gateway.networking.k8s.io', version => 'v1' },
    nodes          => { kind => 'Node',         group => '',                          version => 'v1', cluster => 1,
                        short => 'no' },
    endpointslices => { kind => 'EndpointSlice', group => 'discovery.k8s.io',         version => 'v1' },
    services       => { kind => 'Service',      group => '',                          version => 'v1', short => 'svc' },
);

# A kind's apiVersion: "v1" for the core group.
sub _api_version { my ($k) = @_; return $k->{group} ? "$k->{group}/$k->{version}" : $k->{version} }
my $RESOURCES = join '|', sort keys %KINDS;

# new($t, $name, tls => [crt, key], client_ca => CA_FILE, token => TEXT, exporter => 1,
#     gateway => 1, bookmark => SECONDS, gone_as_event => 1, forbid => [RESOURCE, ...])
# Without a test ($t undef), dir, port and host (the address it listens on and names in its
# URL), and listen (0.0.0.0: every address) are given: the lab's server (docker/lab), whose
# folder its scripts reach with attach.
sub new {
    my ($class, $t, $name, %o) = @_;
    my $dir = $o{dir} // $t->dir . "/kube-$name";
    mkdir $dir;
    my $self = bless { t => $t, name => $name, dir => $dir, port => $o{port} // $t->port("kube_$name"), %o }, $class;
    $self->_write('log', '');
    $self->_write('compacted', "0\n");
    $self->_write('mode', "ok\n");
    $self->_write('rv', "1000");
    $self->_write('requests', '');
    $self->set_token($o{token}) if defined $o{token};
    return $self;
}

# The server whose state folder is DIR, started elsewhere (another process or container),
# to change its objects: nothing of its state is reset.
sub attach {
    my ($class, $dir, %o) = @_;
    -d $dir or die "no fake API server's folder $dir\n";
    return bless { name => 'attached', dir => $dir, %o }, $class;
}

sub port { $_[0]{port} }
sub dir { $_[0]{dir} }

# A kubeconfig for kubectl against this server, in DIR (the test folder by default); KUBECONFIG
# points at it, and HOME at DIR (kubectl's discovery cache goes under it).
sub kubeconfig {
    my ($self, $dir) = @_;
    $dir //= $self->{t}->dir;
    open my $fh, '>', "$dir/kubeconfig" or die "$dir/kubeconfig: $!\n";
    print $fh <<"EOF";
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {server: "@{[$self->url]}"}
users:
- name: edge
  user: {}
contexts:
- name: fake
  context: {cluster: fake, user: edge}
current-context: fake
EOF
    close $fh or die "$dir/kubeconfig: $!\n";
    $ENV{KUBECONFIG} = "$dir/kubeconfig";
    $ENV{HOME} = $dir;
}

# A started server of a native route document that routes one name to upstream "a" (the
# test's port "a"): the server, a sub that routes another name instead, and the stream lines
# of an edge reading it (its listener is port "edge", with a server "a" answering "a").
sub one_route_document {
    my ($t) = @_;
    my $kube = Edge::FakeKube->new($t, 'doc');
    my $route = sub {
        my ($name) = @_;
        $kube->set_document(qq({"upstreams": {"a": {"servers": ["127.0.0.1:@{[$t->port('a')]}"]}}, "routes": {"$name": "a"}}));
    };
    $route->('one.test');
    $kube->start;
    my $url = $kube->url('/edge.json');
    return ($kube, $route, <<"EOF");
    edge_routes_url $url name=doc format=edge interval=1s timeout=3s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
}

sub url {
    my ($self, $path) = @_;
    my $scheme = $self->{tls} ? 'https' : 'http';
    return "$scheme://@{[$self->{host} // '127.0.0.1']}:$self->{port}" . ($path // '');
}

sub _write {
    my ($self, $file, $text) = @_;
    my $path = "$self->{dir}/$file";
    open my $fh, '>', "$path.tmp" or die "$path: $!\n";
    print $fh $text;
    close $fh;
    rename "$path.tmp", $path or die "rename $path: $!\n";
}

sub _read {
    my ($self, $file) = @_;
    open my $fh, '<', "$self->{dir}/$file" or return '';
    local $/;
    return scalar <$fh>;
}

sub set_mode { my ($self, @mode) = @_; $self->_write('mode', "@mode\n") }

# The native route document served at /edge.json.
sub set_document { $_[0]->_write('edge.json', $_[1]) }
sub set_token { $_[0]->_write('token', "$_[1]\n") }

# The requests the server has seen: [method, target, had a token, tls or plain,
# If-None-Match or '-', the connection (the process that served it), when (Unix seconds)].
sub requests {
    my ($self) = @_;
    return [map { [split /\t/] } grep { length } split /\n/, $self->_read('requests')];
}

# Watches under way now (connections between their head and their end).
sub watching {
    my ($self) = @_;
    return scalar(() = glob "$self->{dir}/watch.*");
}

sub last_rv {
    my ($self) = @_;
    my $rv = $self->_read('rv');
    return length $rv ? $rv + 0 : 1000;
}

sub _append {
    my ($self, $type, $resource, $obj) = @_;
    my $rv = $self->last_rv + 1;
    $obj->{metadata}{resourceVersion} = "$rv";
    open my $fh, '>>', "$self->{dir}/log" or die "log: $!\n";
    print $fh join("\t", $rv, $type, $resource, $json->encode($obj)), "\n";
    close $fh;
    $self->_write('rv', $rv);
    return $rv;
}

# ADDED, without looking whether the object exists (for benchmarks: fast at any size).
sub add {
    my ($self, $obj) = @_;
    return $self->_append('ADDED', resource_of($obj), $obj);
}

# Current objects of a resource, by "namespace/name", from the log.
sub _objects {
    my ($self, $resource, $upto) = @_;
    my %objs;
    for my $line (grep { length } split /\n/, $self->_read('log')) {
        my ($rv, $type, $res, $text) = split /\t/, $line, 4;
        last if defined $upto && $rv > $upto;
        next unless $res eq $resource;
        my $o = $json->decode($text);
        my $key = ($o->{metadata}{namespace} // '') . "/$o->{metadata}{name}";
        if ($type eq 'DELETED') { delete $objs{$key} } else { $objs{$key} = $o }
    }
    return \%objs;
}

# An Ingress as the API server stores it. %o: hosts (rules), tls (hosts), ip, class,
# norule (a rule without host), annotations, created (creationTimestamp).
sub ingress {
    my ($ns, $name, %o) = @_;
    my @rules = map { { host => $_, http => { paths => [{ path => '/', pathType => 'Prefix',
        backend => { service => { name => 'web', port => { number => 80 } } } }] } } } @{$o{hosts} // []};
    push @rules, { http => { paths => [{ path => '/', pathType => 'Prefix',
        backend => { service => { name => 'default', port => { number => 80 } } } }] } } if $o{norule};
    return {
        apiVersion => 'networking.k8s.io/v1',
        kind => 'Ingress',
        metadata => {
            name => $name, namespace => $ns, uid => sprintf('%08x-0000-4000-8000-%012x', length($name), time * 1000 % 1e12),
            generation => 1, creationTimestamp => $o{created} // '2026-11-29T10:00:00Z',
            annotations => { 'kubectl.kubernetes.io/last-applied-configuration' => '{"apiVersion":"networking.k8s.io/v1"}',
                %{$o{annotations} // {}} },
            managedFields => [{ manager => 'kubectl-client-side-apply', operation => 'Update',
                apiVersion => 'networking.k8s.io/v1', time => '2026-11-29T10:00:00Z', fieldsType => 'FieldsV1',
                fieldsV1 => { 'f:spec' => { 'f:rules' => {}, 'f:tls' => {} } } }],
        },
        spec => {
            ($o{class} ? (ingressClassName => $o{class}) : ()),
            rules => \@rules,
            ($o{tls} ? (tls => [{ hosts => $o{tls}, secretName => "$name-tls" }]) : ()),
        },
        status => { loadBalancer => { ingress => [map { { ip => $_ } } ($o{ip} ? @{ref $o{ip} ? $o{ip} : [$o{ip}]} : ())] } },
    };
}

# A Gateway API route (HTTPRoute or TLSRoute) with spec.hostnames, attached to the Gateway
# "gw" of its namespace, which accepted it (as its controller writes in status.parents).
sub route {
    my ($kind, $ns, $name, @hosts) = @_;
    my $version = $kind eq 'TLSRoute' ? 'v1alpha2' : 'v1';
    return {
        apiVersion => "gateway.networking.k8s.io/$version", kind => $kind,
        metadata => { name => $name, namespace => $ns, uid => "u-$name", generation => 1,
            creationTimestamp => '2026-11-29T10:00:00Z' },
        spec => { parentRefs => [{ name => 'gw' }], hostnames => \@hosts,
            rules => [{ backendRefs => [{ name => 'web', port => 443 }] }] },
        status => { parents => [{ parentRef => { group => 'gateway.networking.k8s.io', kind => 'Gateway', name => 'gw' },
            controllerName => 'example.net/gateway-controller',
            conditions => [{ type => 'Accepted', status => 'True', reason => 'Accepted',
                lastTransitionTime => '2026-11-29T10:00:01Z', observedGeneration => 1 }] }] },
    };
}

# An IngressClass (cluster-wide); %o: default (the cluster's default class).
sub ingressclass {
    my ($name, %o) = @_;
    return {
        apiVersion => 'networking.k8s.io/v1', kind => 'IngressClass',
        metadata => { name => $name, uid => "c-$name", generation => 1, creationTimestamp => '2026-11-29T09:00:00Z',
            ($o{default} ? (annotations => { 'ingressclass.kubernetes.io/is-default-class' => 'true' }) : ()) },
        spec => { controller => 'k8s.io/ingress-nginx' },
    };
}

# A Node as the kubelet reports it. %o: ready (True, False or Unknown; True by default),
# unschedulable (cordoned), taints ([key, ...]), labels ({...}), ipv6 (a second InternalIP).
sub node {
    my ($name, $ip, %o) = @_;
    my $ready = $o{ready} // 'True';
    return {
        apiVersion => 'v1', kind => 'Node',
        metadata => { name => $name, uid => "n-$name", creationTimestamp => '2026-11-29T08:00:00Z',
            labels => { 'kubernetes.io/hostname' => $name, 'kubernetes.io/os' => 'linux', %{$o{labels} // {}} },
            annotations => { 'node.alpha.kubernetes.io/ttl' => '0' } },
        spec => { podCIDR => '10.42.0.0/24', providerID => "rke2://$name",
            ($o{unschedulable} ? (unschedulable => JSON::PP::true()) : ()),
            ($o{taints} ? (taints => [map { { key => $_, value => '1764403200', effect => 'NoSchedule' } } @{$o{taints}}]) : ()) },
        status => {
            addresses => [{ type => 'InternalIP', address => $ip }, ($o{ipv6} ? ({ type => 'InternalIP', address => $o{ipv6} }) : ()),
                { type => 'Hostname', address => $name }],
            conditions => [
                { type => 'MemoryPressure', status => 'False', reason => 'KubeletHasSufficientMemory' },
                { type => 'Ready', status => $ready, reason => $ready eq 'True' ? 'KubeletReady' : 'NodeStatusUnknown',
                  lastHeartbeatTime => '2026-11-29T10:00:00Z', lastTransitionTime => '2026-11-29T08:00:00Z' }],
            nodeInfo => { kubeletVersion => 'v1.30.6+rke2r1', osImage => 'Debian GNU/Linux 12 (bookworm)' },
        },
    };
}

# The EndpointSlice NAME of Service SERVICE in NS, as the EndpointSlice controller writes it.
# @endpoints: [address, node, %conditions (ready, serving, terminating: 'true' or 'false';
# absent when not given)].
sub endpointslice {
    my ($ns, $name, $service, @endpoints) = @_;
    return {
        apiVersion => 'discovery.k8s.io/v1', kind => 'EndpointSlice', addressType => 'IPv4',
        metadata => { name => $name, namespace => $ns, uid => "e-$name", generation => 1,
            creationTimestamp => '2026-11-29T08:00:00Z',
            labels => { 'kubernetes.io/service-name' => $service,
                'endpointslice.kubernetes.io/managed-by' => 'endpointslice-controller.k8s.io' },
            ownerReferences => [{ apiVersion => 'v1', kind => 'Service', name => $service, uid => "s-$service" }] },
        endpoints => [map {
            my ($address, $node, %c) = @$_;
            { addresses => [$address], nodeName => $node,
              conditions => { map { ($_ => $c{$_} eq 'true' ? JSON::PP::true() : JSON::PP::false()) } keys %c },
              targetRef => { kind => 'Pod', namespace => $ns, name => "$service-$node" } }
        } @endpoints],
        ports => [{ name => 'https', port => 443, protocol => 'TCP' }, { name => 'http', port => 80, protocol => 'TCP' }],
    };
}

# A Service NS/NAME of type NodePort: @ports [port, nodePort]; %o: local (externalTrafficPolicy
# Local), type (NodePort by default).
sub service {
    my ($ns, $name, $ports, %o) = @_;
    return {
        apiVersion => 'v1', kind => 'Service',
        metadata => { name => $name, namespace => $ns, uid => "s-$name", creationTimestamp => '2026-11-29T08:00:00Z' },
        spec => { type => $o{type} // 'NodePort', clusterIP => '10.43.0.10', clusterIPs => ['10.43.0.10'],
            externalTrafficPolicy => $o{local} ? 'Local' : 'Cluster', selector => { app => $name },
            ports => [map { { name => "p$_->[0]", port => 0 + $_->[0], targetPort => 0 + $_->[0], nodePort => 0 + $_->[1],
                protocol => 'TCP' } } @$ports] },
        status => { loadBalancer => {} },
    };
}

# The object named, as the server holds it now, or undef.
sub get {
    my ($self, $kind, $ns, $name) = @_;
    my ($res) = grep { $KINDS{$_}{kind} eq $kind } keys %KINDS;
    return $self->_objects($res)->{($ns // '') . "/$name"};
}

# A Gateway with listeners [name, hostname or undef], as its controller programmed it.
sub gateway {
    my ($ns, $name, @listeners) = @_;
    return {
        apiVersion => 'gateway.networking.k8s.io/v1', kind => 'Gateway',
        metadata => { name => $name, namespace => $ns, uid => "g-$name", generation => 1,
            creationTimestamp => '2026-11-29T09:00:00Z' },
        spec => { gatewayClassName => 'example', listeners => [map { my ($l, $h) = @$_;
            { name => $l, protocol => 'HTTPS', port => 443, (defined $h ? (hostname => $h) : ()) } } @listeners] },
        status => { conditions => [{ type => 'Programmed', status => 'True' }] },
    };
}

sub resource_of {
    my ($obj) = @_;
    my ($r) = grep { $KINDS{$_}{kind} eq $obj->{kind} } keys %KINDS;
    return $r // die "unknown kind $obj->{kind}\n";
}

# ADDED or MODIFIED, as the object is new or not; returns the new resourceVersion.
sub apply {
    my ($self, $obj) = @_;
    my $res = resource_of($obj);
    my $key = ($obj->{metadata}{namespace} // '') . "/$obj->{metadata}{name}";
    my $type = $self->_objects($res)->{$key} ? 'MODIFIED' : 'ADDED';
    return $self->_append($type, $res, $obj);
}

sub delete {
    my ($self, $obj) = @_;
    my $res = resource_of($obj);
    my $key = ($obj->{metadata}{namespace} // '') . "/$obj->{metadata}{name}";
    my $cur = $self->_objects($res)->{$key} or die "no $key to delete\n";
    return $self->_append('DELETED', $res, $cur);
}

# etcd compaction: every resourceVersion up to now is gone (watches from them get 410).
sub compact {
    my ($self) = @_;
    $self->_write('compacted', $self->last_rv . "\n");
}

sub _listen {
    my ($self) = @_;
    my $listen = IO::Socket::INET->new(Listen => 128, LocalAddr => $self->{listen} // $self->{host} // '127.0.0.1',
        LocalPort => $self->{port}, Proto => 'tcp', ReuseAddr => 1)
        or die "fake API server on $self->{port}: $!\n";
    return $listen;
}

# Answers connections for ever, each in a process of its own.
sub _serve {
    my ($self, $listen) = @_;
    $SIG{CHLD} = 'IGNORE';
    $SIG{PIPE} = 'IGNORE';
    while (1) {
        my $c = $listen->accept or next;
        my $child = fork();
        if (defined $child && $child == 0) {
            close $listen;
            eval { $self->_connection($c) };
            POSIX::_exit(0);
        }
        close $c;
    }
}

# The server in this process, in the foreground (the lab's container).
sub serve { $_[0]->_serve($_[0]->_listen) }

sub start {
    my ($self) = @_;
    my $listen = $self->_listen;
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        setpgrp(0, 0);
        $self->_serve($listen);
    }
    close $listen;
    $self->{pid} = $pid;
    $self->{t}{fake_kube}{$self->{name}} = $self if $self->{t};
    return $self;
}

# Stops the server and every connection it holds.
sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;
    # At exit, the status of the test script, not of the server killed here.
    local $?;
    kill 'KILL', -$pid;
    waitpid($pid, 0);
    unlink glob "$self->{dir}/watch.*";
}

sub DESTROY { $_[0]->stop }

sub _status_json {
    my ($code, $reason, $message) = @_;
    return $json->encode({ kind => 'Status', apiVersion => 'v1', metadata => {}, status => 'Failure',
        message => $message, reason => $reason, code => $code });
}

# Whether the answer being made may keep its connection (an HTTP/1.1 request that did not ask
# to close it), and whether the last answer did: the connection then waits for the next
# request. Only answers made by _respond keep it (watches and the slow modes close).
our ($KEEP, $KEPT) = (0, 0);

sub _respond {
    my ($c, $code, $body, %h) = @_;
    my %text = (200 => 'OK', 304 => 'Not Modified', 400 => 'Bad Request', 405 => 'Method Not Allowed', 401 => 'Unauthorized', 403 => 'Forbidden', 404 => 'Not Found',
        410 => 'Gone', 500 => 'Internal Server Error');
    my $head = "HTTP/1.1 $code " . ($text{$code} // 'X') . "\r\nContent-Type: application/json\r\n"
        . join('', map { "$_: $h{$_}\r\n" } sort keys %h)
        . "Content-Length: " . length($body) . "\r\n" . ($KEEP ? '' : "Connection: close\r\n") . "\r\n";
    $KEPT = $KEEP;
    print $c $head, $body;
}

sub _connection {
    my ($self, $c) = @_;
    if ($self->{tls}) {
        require IO::Socket::SSL;
        # With client_ca, a client certificate from that CA is required.
        IO::Socket::SSL->start_SSL($c, SSL_server => 1, Timeout => 10,
            SSL_cert_file => $self->{tls}[0], SSL_key_file => $self->{tls}[1],
            $self->{client_ca} ? (SSL_verify_mode => 0x03, SSL_ca_file => $self->{client_ca}) : ())
            or do {
                if (open my $log, '>>', "$self->{dir}/handshakes") { print $log "refused\n"; close $log }
                return;
            };
    }
    while (1) {
        local ($KEEP, $KEPT) = (0, 0);
        my $req = '';
        while ($req !~ /\r\n\r\n/) {
            my $n = sysread($c, my $buf, 16384);
            return unless $n;
            $req .= $buf;
        }
        $KEEP = $req =~ m{^\S+ \S+ HTTP/1\.1\r\n} && $req !~ m{\r\nConnection:[^\r\n]*close}i ? 1 : 0;
        $c->autoflush(1);
        $self->_request($c, $req);
        return unless $KEPT;
        # An API server's idle timeout, say, closing a connection it answered as kept.
        return if $self->_read('mode') =~ /^drop-kept/;
    }
}

# One request of a connection; the log says which connection (the process serving it).
sub _request {
    my ($self, $c, $req) = @_;
    my ($method, $target) = $req =~ m{^(\S+) (\S+) HTTP/1\.[01]\r\n} or return;
    my ($auth) = $req =~ m{\r\nAuthorization: Bearer (\S+)\r\n}i;
    my ($inm) = $req =~ m{\r\nIf-None-Match: ([^\r\n]+)\r\n}i;
    if (open my $log, '>>', "$self->{dir}/requests") {
        print $log join("\t", $method, $target, defined $auth ? 1 : 0, $self->{tls} ? 'tls' : 'plain',
            defined $inm ? $inm : "-", $$, Time::HiRes::time()), "\n";
        close $log;
    }
    my $token = $self->_read('token');
    chomp $token;
    if (length $token && (($auth // '') ne $token)) {
        return _respond($c, 401, _status_json(401, 'Unauthorized', 'Unauthorized'));
    }
    my ($mode, $only) = split ' ', $self->_read('mode');
    $mode //= 'ok';
    $mode = 'ok' if defined $only && index($target, $only) < 0;
    return if $mode eq 'hang' && sleep 3600;
    return _respond($c, 500, _status_json(500, 'InternalError', 'etcdserver: request timed out'))
        if $mode eq '500';
    return _respond($c, 200, 'this is not { JSON') if $mode eq 'garbage';

    my ($path, $query) = split /\?/, $target, 2;
    my ($length) = $req =~ m{\r\nContent-Length: (\d+)\r\n}i;
    my $sent = $req =~ s/^.*?\r\n\r\n//sr;
    while (length($sent) < ($length // 0)) {
        my $n = sysread($c, my $buf, 16384);
        last unless $n;
        $sent .= $buf;
    }
    if ($path eq '/edge.json') {
        # A native route document, as an exporter serves it.
        my $doc = $self->_read('edge.json');
        my $etag = '"' . length($doc) . '-' . unpack('%32C*', $doc) . '"';
        return _respond($c, 304, '', ETag => $etag) if defined $inm && $inm eq $etag;
        return _respond($c, 200, $doc, ETag => $etag);
    }
    my %q = map { my ($k, $v) = split /=/, $_, 2; ($k => _unescape($v // '')) } split /&/, $query // '';
    my ($group, $version, $ns, $res, $one) = $path =~
        m{^(?:/apis/([^/]+)|/api)/([^/]+)(?:/namespaces/([^/]+))?/($RESOURCES)(?:/([^/]+))?$};
    return $self->_discovery($c, $path) if !defined $res && $path =~ m{^/(api|apis|version)(/|$)};
    return _respond($c, 404, _status_json(404, 'NotFound', 'the server could not find the requested resource'))
        unless defined $res;
    $group //= '';
    my $k = $KINDS{$res};
    if (grep { $_ eq $res } @{$self->{forbid} // []}) {
        return _respond($c, 403, _status_json(403, 'Forbidden',
            "$res.$k->{group} is forbidden: User \"system:serviceaccount:edge:edge\" cannot list resource \"$res\""));
    }
    if ($group ne $k->{group} || $version ne $k->{version} || ($group =~ /gateway/ && !$self->{gateway})
        || ($k->{cluster} && defined $ns)) {
        return _respond($c, 404, _status_json(404, 'NotFound', 'the server could not find the requested resource'));
    }
    return $self->_one($c, $method, $res, $ns, $one, $sent) if defined $one;
    # A page of more than 64 MiB unless fewer than 100 objects are asked for.
    if ($mode eq 'bigpages' && ($q{watch} // '') !~ /^(1|true)$/ && !(($q{limit} // 0) > 0 && $q{limit} < 100)) {
        $mode = 'oversized';
    }
    if ($mode eq 'oversized') {
        my $filler = 'x' x (1 << 20);
        my $n = 70;
        print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            . (length($filler) * $n + 30) . "\r\nConnection: close\r\n\r\n";
        print $c $filler for 1 .. $n;
        return;
    }
    my $watch = ($q{watch} // '') =~ /^(1|true)$/;
    if ($watch && !$self->{exporter}) {
        return $self->_watch($c, $res, $ns, \%q, $mode);
    }
    # A list: the whole of it (exporter, with an ETag), or a page.
    my $rv = $self->last_rv;
    my ($from_rv, $offset) = (undef, 0);
    if (my $cont = $q{continue}) {
        ($from_rv, $offset) = split /:/, $cont;
        my $compacted = $self->_read('compacted') + 0;
        if ($from_rv < $compacted) {
            return _respond($c, 410, _status_json(410, 'Expired',
                'The provided continue parameter is too old to display a consistent list result.'));
        }
        $rv = $from_rv;
    }
    # The objects at a resourceVersion do not change: the pages of a list that come on one
    # connection are cut from one read of them, as an API server serves a list's pages from
    # one snapshot (only the last list is kept, in the process serving the connection).
    my $at = "$res $rv";
    $self->{listed} = [$at, $self->_objects($res, $rv)] unless $self->{listed} && $self->{listed}[0] eq $at;
    my $objs = $self->{listed}[1];
    my @items = map { $objs->{$_} } sort grep { !defined $ns || m{^\Q$ns\E/} } keys %$objs;
    my $etag = "\"$res-$rv\"";
    if ($self->{exporter}) {
        return _respond($c, 304, '', ETag => $etag) if defined $inm && $inm eq $etag;
        $offset = 0;
        %q = ();
    }
    my $limit = $q{limit} || scalar(@items) || 1;
    my @page = @items[$offset .. ($offset + $limit - 1 < $#items ? $offset + $limit - 1 : $#items)];
    my %meta = (resourceVersion => "$rv");
    $meta{continue} = "$rv:" . ($offset + $limit) if $offset + $limit < @items;
    $meta{remainingItemCount} = @items - $offset - $limit if $meta{continue};
    my $body = $json->encode({ kind => "$k->{kind}List", apiVersion => _api_version($k),
        metadata => \%meta, items => [grep { defined } @page] });
    if ($mode eq 'slow') {
        print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            . length($body) . "\r\nConnection: close\r\n\r\n";
        $c->autoflush(1);
        for my $byte (split //, $body) { print $c $byte; sleep 0.5 }
        return;
    }
    _respond($c, 200, $body, $self->{exporter} ? (ETag => $etag) : ());
}

# One object: GET, or PATCH with a JSON merge patch (a strategic merge patch of plain fields is
# the same: `{"spec":{"unschedulable":true}}`, null to remove a field).
sub _one {
    my ($self, $c, $method, $res, $ns, $name, $body) = @_;
    my $k = $KINDS{$res};
    my $cur = $self->_objects($res)->{($ns // '') . "/$name"}
        or return _respond($c, 404, _status_json(404, 'NotFound', "$res \"$name\" not found"));
    if ($method eq 'PATCH') {
        my $patch = eval { $json->decode($body) };
        return _respond($c, 400, _status_json(400, 'BadRequest', 'the patch is not JSON'))
            unless ref $patch eq 'HASH';
        _merge($cur, $patch);
        $self->_append('MODIFIED', $res, $cur);
    } elsif ($method ne 'GET') {
        return _respond($c, 405, _status_json(405, 'MethodNotAllowed', "$method is not served here"));
    }
    $cur->{kind} = $k->{kind};
    $cur->{apiVersion} = _api_version($k);
    _respond($c, 200, $json->encode($cur));
}

sub _merge {
    my ($into, $patch) = @_;
    for my $key (keys %$patch) {
        my $v = $patch->{$key};
        if (!defined $v) { delete $into->{$key} }
        elsif (ref $v eq 'HASH' && ref $into->{$key} eq 'HASH') { _merge($into->{$key}, $v) }
        elsif (ref $v eq 'HASH') { $into->{$key} = {}; _merge($into->{$key}, $v) }
        else { $into->{$key} = $v }
    }
}

sub _unescape {
    my ($v) = @_;
    $v =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
    return $v;
}

sub _chunk {
    my ($c, $text) = @_;
    return print $c sprintf("%x\r\n", length $text), $text, "\r\n";
}

sub _watch {
    my ($self, $c, $res, $ns, $q, $mode) = @_;
    my $from = $q->{resourceVersion} // 0;
    my $compacted = $self->_read('compacted') + 0;
    my $gone = $from ne '' && $from < $compacted;
    if ($gone && !$self->{gone_as_event}) {
        return _respond($c, 410, _status_json(410, 'Expired', "too old resource version: $from ($compacted)"));
    }
    print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        . "Connection: close\r\n\r\n";
    $c->autoflush(1);
    if ($gone) {
        _chunk($c, $json->encode({ type => 'ERROR', object => $json->decode(_status_json(410, 'Expired',
            "too old resource version: $from ($compacted)")) }) . "\n");
        print $c "0\r\n\r\n";
        return;
    }
    if ($mode eq 'eventsize') {
        _chunk($c, '{"type":"ADDED","object":{"metadata":{"name":"' . ('x' x (5 << 20)));
    }
    my $mark = "$self->{dir}/watch.$$";
    if (open my $m, ">", $mark) { close $m }
    my $end = time + ($q->{timeoutSeconds} || 1800);
    my $bookmark = $self->{bookmark};
    my $next_bookmark = time + ($bookmark // 1e9);
    my $seen = $from;
    my $k = $KINDS{$res};
    require IO::Select;
    my $sel = IO::Select->new($c);
    # The log is read as it grows, from where the last look ended.
    open my $log, '<', "$self->{dir}/log" or return;
    my $partial = '';
    while (time < $end) {
        # The client closed: the watch is over (a real API server sees the same).
        if ($sel->can_read(0)) {
            my $n = sysread($c, my $buf, 4096);
            last if !$n && !($c->can('errstr') && $c->errstr =~ /want/i);
        }
        while (sysread($log, my $chunk, 1 << 20)) { $partial .= $chunk }
        my $end_of_lines = rindex($partial, "\n");
        my $lines = $end_of_lines < 0 ? '' : substr($partial, 0, $end_of_lines + 1, '');
        for my $line (split /\n/, $lines) {
            my ($rv, $type, $r, $text) = split /\t/, $line, 4;
            next if $rv <= $seen;
            $seen = $rv;
            next unless $r eq $res;
            # Only the namespace is looked at before the object is sent.
            next if defined $ns && $text !~ /"namespace":"\Q$ns\E"/;
            _chunk($c, qq({"object":$text,"type":"$type"}\n)) or last;
        }
        if (($q->{allowWatchBookmarks} // '') eq 'true' && time >= $next_bookmark) {
            _chunk($c, $json->encode({ type => 'BOOKMARK', object => { kind => $k->{kind},
                apiVersion => _api_version($k), metadata => { resourceVersion => "$seen" } } }) . "\n");
            $next_bookmark = time + $bookmark;
        }
        sleep 0.02;
    }
    print $c "0\r\n\r\n";
    unlink $mark;
}

sub _discovery {
    my ($self, $c, $path) = @_;
    my @groups = (['networking.k8s.io', 'v1'], ['discovery.k8s.io', 'v1']);
    push @groups, ['gateway.networking.k8s.io', 'v1'] if $self->{gateway};
    my $body;
    if ($path eq '/version') {
        $body = { major => '1', minor => '30', gitVersion => 'v1.30.0', platform => 'linux/amd64' };
    } elsif ($path eq '/api') {
        $body = { kind => 'APIVersions', versions => ['v1'],
            serverAddressByClientCIDRs => [{ clientCIDR => '0.0.0.0/0', serverAddress => "@{[$self->{host} // '127.0.0.1']}:$self->{port}" }] };
    } elsif ($path eq '/api/v1') {
        $body = { kind => 'APIResourceList', groupVersion => 'v1', resources => [
            { name => 'namespaces', singularName => 'namespace', namespaced => JSON::PP::false(),
              kind => 'Namespace', verbs => [qw(get list watch)] },
            map { { name => $_, singularName => lc $KINDS{$_}{kind}, namespaced => $KINDS{$_}{cluster} ? JSON::PP::false() : JSON::PP::true(),
              kind => $KINDS{$_}{kind}, verbs => [qw(get list patch watch)], shortNames => [$KINDS{$_}{short}] } }
            grep { $KINDS{$_}{group} eq '' } sort keys %KINDS] };
    } elsif ($path eq '/apis') {
        $body = { kind => 'APIGroupList', apiVersion => 'v1', groups => [map {
            my ($g, $v) = @$_;
            my @versions = ({ groupVersion => "$g/$v", version => $v });
            push @versions, { groupVersion => "$g/v1alpha2", version => 'v1alpha2' } if $g =~ /gateway/;
            { name => $g, versions => \@versions, preferredVersion => { groupVersion => "$g/$v", version => $v } }
        } @groups] };
    } elsif (my ($g, $v) = $path =~ m{^/apis/([^/]+)/([^/]+)$}) {
        my @res = grep { $g ne '' && $KINDS{$_}{group} eq $g && $KINDS{$_}{version} eq $v } sort keys %KINDS;
        return _respond($c, 404, _status_json(404, 'NotFound', 'not found'))
            unless @res && ($g !~ /gateway/ || $self->{gateway});
        $body = { kind => 'APIResourceList', apiVersion => 'v1', groupVersion => "$g/$v", resources => [map {
            { name => $_, singularName => lc $KINDS{$_}{kind},
              namespaced => $KINDS{$_}{cluster} ? JSON::PP::false() : JSON::PP::true(),
              kind => $KINDS{$_}{kind}, verbs => [qw(create delete get list patch update watch)],
              ($_ eq 'ingresses' ? (shortNames => ['ing']) : ()) }
        } @res] };
    } else {
        return _respond($c, 404, _status_json(404, 'NotFound', 'not found'));
    }
    _respond($c, 200, $json->encode($body));
}

1;
