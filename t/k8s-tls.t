#!/usr/bin/perl
# An API server over https: verified against ca= (by the IP address or name in the URL) before
# any byte of the request, with the bearer token from token_file=, re-read when kubelet swaps
# the file's ..data link. A server whose certificate is not from ca=, or not for the address,
# gets no request at all, so never the token. nginx -t checks every argument.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $dir = $t->dir;
$t->ca('ca');
$t->ca('other');
my @good = $t->signed_certificate('ca', 'api', 'IP:127.0.0.1');
my @evil = $t->signed_certificate('other', 'evil', 'IP:127.0.0.1');
my @wrong_ip = $t->signed_certificate('ca', 'elsewhere', 'IP:127.0.0.2', 'DNS:api.test');

# The token as kubelet projects it: token -> ..data/token, ..data -> a timestamped folder.
sub project_token {
    my ($value, $stamp) = @_;
    mkdir "$dir/sa";
    mkdir "$dir/sa/..$stamp";
    $t->write_file("sa/..$stamp/token", $value);
    symlink "..$stamp", "$dir/sa/..data_tmp" or die "symlink: $!";
    rename "$dir/sa/..data_tmp", "$dir/sa/..data" or die "rename: $!";
    symlink '..data/token', "$dir/sa/token" unless -l "$dir/sa/token";
}
project_token('token-1', '2026_11_29_10_00_00.1');

my $kube = Edge::FakeKube->new($t, 'a', tls => \@good, token => 'token-1');
$kube->apply(Edge::FakeKube::ingress('web', 'shop', hosts => ['shop.test']));
$kube->start;
my $evil = Edge::FakeKube->new($t, 'evil', tls => \@evil);
$evil->apply(Edge::FakeKube::ingress('web', 'phish', hosts => ['phish.test']));
$evil->start;
my $wrong = Edge::FakeKube->new($t, 'wrong', tls => \@wrong_ip);
$wrong->apply(Edge::FakeKube::ingress('web', 'other', hosts => ['other.test']));
$wrong->start;

$t->write_routes('routes.json', <<'EOF2');
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}}
EOF2
my ($url, $evil_url, $wrong_url) = map { $_->url } $kube, $evil, $wrong;
my $conf = <<"EOF2";
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=a format=k8s upstream=a token_file=%%TESTDIR%%/sa/token ca=%%TESTDIR%%/ca.crt;
    edge_routes_url $evil_url name=evil format=k8s upstream=a token_file=%%TESTDIR%%/sa/token ca=%%TESTDIR%%/ca.crt;
    edge_routes_url $wrong_url name=wrong format=k8s upstream=a token_file=%%TESTDIR%%/sa/token ca=%%TESTDIR%%/ca.crt;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF2
$t->config($conf);
$t->run;
my $edge = $t->port('edge');

wait_for(sub { http_get($edge, 'shop.test') eq 'a' }, 'shop.test over https');
pass('an Ingress read over verified https with a bearer token routes');
ok((grep { $_->[2] } @{$kube->requests}) == @{$kube->requests}, 'every request carried the token');
$t->wait_for_log(qr/edge_routes_url evil: the certificate of 127\.0\.0\.1:\d+ is not trusted by ca=/);
pass('a certificate from another CA is refused');
$t->wait_for_log(qr/edge_routes_url wrong: the certificate of 127\.0\.0\.1:\d+ is not trusted by ca= \(.*mismatch/);
pass('a certificate for another address is refused');
is(scalar @{$evil->requests}, 0, 'the untrusted server got no request at all');
is(scalar @{$wrong->requests}, 0, 'nor did the one for another address');
is(http_get($edge, 'phish.test'), '', 'and nothing it serves routes');
unlike($t->read_file('error.log') . $t->read_file('state/' . (map { s{.*/}{}r } glob("$dir/state/*.status"))[0]),
    qr/token-1/, 'the token is in no log and no status');

# Rotation: kubelet swaps ..data; the API server takes only the new token from now on.
project_token('token-2', '2026_11_29_11_00_00.2');
$kube->stop;
$kube->set_token('token-2');
$kube->apply(Edge::FakeKube::ingress('web', 'rotated', hosts => ['rotated.test']));
$kube->start;
wait_for(sub { http_get($edge, 'rotated.test') eq 'a' }, 'a change read with the rotated token');
pass('the rotated token is read and used');

# An API server that authenticates clients by certificate: certificate= and certificate_key=.
$t->ca('clients');
my @client = $t->signed_certificate('clients', 'edge-client', 'DNS:nginx-edge');
my $mtls = Edge::FakeKube->new($t, 'mtls', tls => \@good, client_ca => "$dir/clients.crt");
$mtls->apply(Edge::FakeKube::ingress('web', 'mtls', hosts => ['mtls.test']));
$mtls->start;

my $status = Edge::Test::status_json($t->port('status'));
my ($e) = grep { $_->{name} eq 'evil' } @{$status->{urls}};
like($e->{last_error} // '', qr/not trusted/, 'the refusal shows in edge_status');
$t->stop;
my $murl = $mtls->url;
(my $with_cert = $conf) =~ s{(    edge_state)}{    edge_routes_url $murl name=mtls format=k8s upstream=a ca=%%TESTDIR%%/ca.crt
                    certificate=%%TESTDIR%%/edge-client.crt certificate_key=%%TESTDIR%%/edge-client.key;\n$1};
$t->config($with_cert);
$t->run;
wait_for(sub { http_get($edge, 'mtls.test') eq 'a' }, 'a route from the server that wants a client certificate');
pass('the client certificate is presented');
$t->stop;
(my $without_cert = $conf) =~ s{(    edge_state)}{    edge_routes_url $murl name=mtls format=k8s upstream=a ca=%%TESTDIR%%/ca.crt;\n$1};
$t->config($without_cert);
my $before = () = $t->read_file("kube-mtls/handshakes") =~ /refused/g;
$t->run;
wait_for(sub { (() = $t->read_file("kube-mtls/handshakes") =~ /refused/g) > $before }, 'a handshake refused');
pass('without certificate=, the server refuses the handshake');
is(http_get($edge, 'rotated.test'), 'a', 'the other sources still route (from the last good tables)');
$t->stop;

# nginx -t checks each argument.
my @bad = (
    ["edge_routes_url https://127.0.0.1:1 format=k8s;", qr/an https:\/\/ URL needs ca=/],
    ["edge_routes_url http://127.0.0.1:1 token_file=%%TESTDIR%%/sa/token;", qr/token_file= needs an https:\/\/ URL/],
    ["edge_routes_url https://127.0.0.1:1 ca=%%TESTDIR%%/missing.crt;", qr/missing\.crt: No such file/],
    ["edge_routes_url http://127.0.0.1:1 format=k8s upstream=nope;", qr/upstream=nope is not defined/],
    ["edge_routes_url http://127.0.0.1:1 interval=soon;", qr/invalid interval "soon"/],
    ["edge_routes_url ftp://127.0.0.1/;", qr/must start with http:\/\/ or https:\/\//],
    ["edge_routes_url http://api.example.com/x.json;", qr/"api\.example\.com" is a host name: it needs "resolver"/],
    ["edge_routes_url https://127.0.0.1:1 format=k8s ca=%%TESTDIR%%/ca.crt token_file=%%TESTDIR%%/sa/token;\n"
        . "    edge_routes_url https://127.0.0.1:1 format=k8s ca=%%TESTDIR%%/other.crt;",
        qr/https:\/\/127\.0\.0\.1:1\/ is already declared in \S+:\d+ with other connection settings/],
    ["edge_routes_url http://127.0.0.1:1/edge.json timeout=2s;\n    edge_routes_url http://127.0.0.1:1/edge.json timeout=9s;",
        qr/is already declared in \S+:\d+ with other connection settings/],
);
for my $case (@bad) {
    my ($line, $re) = @$case;
    $t->config(<<"EOF2");
    edge_routes %%TESTDIR%%/routes.json;
    $line
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF2
    my ($ok, $out) = $t->test_config;
    ok(!$ok && $out =~ $re, "nginx -t refuses: $line") or diag $out;
}
done_testing;
