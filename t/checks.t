#!/usr/bin/perl
# Active checks towards servers that expect the PROXY protocol (as ingress controllers behind
# `proxy_protocol on` do), and a probe the edge itself cannot make (no free connection), which
# is not counted against the server.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
$t->certificate('backend', 'backend.test');

$t->write_routes('routes.json', <<'EOF');
{
  "upstreams": {
    "v1http": {"servers": ["127.0.0.1:%%PORT_pphttp%%"],
               "check": {"type": "http", "path": "/healthz", "interval": "1s", "fall": 2,
                         "rise": 1, "proxy_protocol": "v1"}},
    "v2tls": {"servers": ["127.0.0.1:%%PORT_pptls%%"],
              "check": {"type": "tls", "interval": "1s", "fall": 2, "rise": 1,
                        "proxy_protocol": "v2"}},
    "v2tcp": {"servers": ["127.0.0.1:%%PORT_pptcp%%"],
              "check": {"type": "tcp", "interval": "1s", "fall": 2, "rise": 1,
                        "proxy_protocol": "v2"}},
    "without": {"servers": ["127.0.0.1:%%PORT_pphttp%%"],
                "check": {"type": "http", "path": "/healthz", "interval": "1s", "fall": 2}}
  },
  "routes": {"v1.test": "v1http", "v2.test": "v2tls", "without.test": "without"}
}
EOF
$t->backend('web', mode => 'http');
$t->config(<<'EOF');
    edge_routes %%TESTDIR%%/routes.json;
    log_format pp '$server_port proxy_protocol_addr=[$proxy_protocol_addr] status=$status';
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream;
             proxy_protocol on; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    # An ingress controller that requires the PROXY protocol, for HTTP and for TLS.
    server { listen 127.0.0.1:%%PORT_pphttp%% proxy_protocol; proxy_pass 127.0.0.1:%%PORT_web%%;
             access_log %%TESTDIR%%/pp.log pp; }
    server { listen 127.0.0.1:%%PORT_pptls%% ssl proxy_protocol; return "tls";
             ssl_certificate %%TESTDIR%%/backend.crt; ssl_certificate_key %%TESTDIR%%/backend.key;
             access_log %%TESTDIR%%/pp.log pp; }
    server { listen 127.0.0.1:%%PORT_pptcp%% proxy_protocol; return "tcp";
             access_log %%TESTDIR%%/pp.log pp; }
EOF
$t->run;
my $status = $t->port('status');
my $state = sub { Edge::Test::server_state($status, @_) // {} };
my ($pphttp, $pptls, $pptcp) = map { $t->port($_) } qw(pphttp pptls pptcp);

for ([v1http => $pphttp, 'http, v1'], [v2tls => $pptls, 'tls, v2'], [v2tcp => $pptcp, 'tcp, v2']) {
    my ($u, $port, $what) = @$_;
    # (A probe may time out on a loaded machine; one that passes shows the header works.)
    wait_for(sub { (($state->($u, "127.0.0.1:$port")->{last_check} // {})->{result} // '') eq 'ok' },
        "a $what check");
    pass("$what check with the PROXY header: ok");
    is($state->($u, "127.0.0.1:$port")->{state}, 'up', "$what: up");
}
# The same server checked without the header: the defect the header fixes.
wait_for(sub { $state->('without', "127.0.0.1:$pphttp")->{state} eq 'down' }, 'the check without the header fails');
pass('without the PROXY header the check cannot pass (nginx closes on a broken header)');
like($t->read_file('error.log'), qr/broken header/, 'the backend says why');

# The headers arrived as PROXY protocol: nginx went past them (a status other than 400, its
# answer to a broken header) and, as the protocol says for a check, took no client address
# from them. (The tls check closes once it has the ServerHello: nginx logs the unfinished
# handshake as 500.)
wait_for(sub { $t->read_file('pp.log') =~ /^$pptcp proxy_protocol_addr=\[-\] status=(?!400)\d+$/m }, 'a tcp check logged');
wait_for(sub { $t->read_file('pp.log') =~ /^$pptls proxy_protocol_addr=\[-\] status=(?!400)\d+$/m }, 'a tls check logged');
pass('the tls check was accepted');

# Real traffic through the edge with `proxy_protocol on`, as the production recipe has it.
like(http_get($t->port('edge'), 'v1.test'), qr/\r\n\r\nweb$/, 'traffic passes through the PROXY listener');
like($t->read_file('pp.log'), qr/^$pphttp proxy_protocol_addr=\[127\.0\.0\.1\] status=200$/m,
    'and carries the client address');
$t->stop;

# --- A probe the edge cannot make is not the server's fault.
my $u = Edge::Test->new;
$u->write_routes('routes.json', <<'EOF');
{
  "upstreams": {"slow": {"servers": ["127.0.0.1:%%PORT_b%%"],
                         "check": {"type": "tcp", "interval": "3s", "fall": 1, "rise": 100}}},
  "routes": {"slow.test": "slow"}
}
EOF
$u->backend('b');
$u->config(<<'EOF', connections => 16);
    edge_routes %%TESTDIR%%/routes.json interval=1h;
    preread_timeout 60s;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
EOF
$u->run;
my $ustatus = $u->port('status');
my $b = $u->port('b');
wait_for(sub { ((Edge::Test::server_state($ustatus, 'slow', "127.0.0.1:$b") // {})->{last_check} // {})->{result} },
    'the first check');
is(Edge::Test::server_state($ustatus, 'slow', "127.0.0.1:$b")->{state}, 'up', 'up to begin with');

# Clients that send nothing take every connection of the worker.
my @idle;
for (1 .. 24) {
    my $c = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . $u->port('edge'), Timeout => 5) or last;
    push @idle, $c;
}
$u->wait_for_log(qr/a check of upstream "slow" server 127\.0\.0\.1:$b could not be started here .* not counted against the server/);
close $_ for @idle;
@idle = ();
my $s = wait_for(sub { Edge::Test::server_state($ustatus, 'slow', "127.0.0.1:$b") }, 'status answers again');
is($s->{state}, 'up', 'the server is still up (fall 1, rise 100: one counted failure would keep it down 300 s)');
is($s->{why}, '', 'with no reason to be down');
is(scalar(() = $u->read_file('error.log') =~ /could not be started here/g), 1, 'logged once');
$u->wait_for_log(qr/edge: checks start again/);

done_testing;
