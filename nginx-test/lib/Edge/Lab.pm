package Edge::Lab;
# The lab's scripts (docker/lab/t/*.t) against the containers docker/lab/run brought up:
# addresses, which edge holds the virtual address, edge_status, the clusters' ACME clients, the
# client container's requests and its steady-load probe.

use strict;
use warnings;
use Exporter 'import';
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Edge::Docker qw(docker docker_ok in_container wait_for);

our @EXPORT_OK = qw(lab_dir addr vip container holder edge_status server_state issue client_https
    client_http certificate_of write_routes probe_start probe_stop probe_records probe_wait kube);

my $net = $ENV{LAB_NET} // '172.29.89';
my %host = (pebble => 10, dns => 11, 'kube-a' => 12, vip => 20, edge1 => 21, edge2 => 22, a1 => 31,
    a2 => 32, a3 => 33, a4 => 35, 'a-acme' => 34, b1 => 41, 'b-acme' => 42, client => 50);

sub lab_dir { $ENV{LAB_DIR} // die "LAB_DIR is not set: run the lab's scripts with docker/lab/run\n" }
sub addr { "$net.$host{$_[0]}" }
sub vip { addr('vip') }
sub container { ($ENV{LAB_PROJECT} // 'edgelab') . "_$_[0]_1" }

# The edge holding the virtual address now: 'edge1', 'edge2', '' for none, 'both' for both.
sub holder {
    my @held = grep {
        in_container(container($_), 'ip', '-4', '-o', 'addr', 'show', 'dev', 'eth0') =~ /inet \Q${\vip()}\E\//
    } qw(edge1 edge2);
    return @held == 2 ? 'both' : $held[0] // '';
}

# The decoded edge_status of an edge (undef when it does not answer).
sub edge_status {
    my ($edge) = @_;
    my $out = in_container(container($edge), 'curl', '-sS', '--max-time', '5', 'http://127.0.0.1:8099/status');
    return $? ? undef : eval { JSON::PP::decode_json($out) };
}

# The state edge_status gives a server ('up', 'down', 'checking'), by its address.
sub server_state {
    my ($edge, $upstream, $address) = @_;
    my $status = edge_status($edge) or return '';
    my ($s) = grep { $_->{address} eq $address } @{ $status->{upstreams}{$upstream}{servers} // [] };
    return $s ? $s->{state} : '';
}

# The ACME client of cluster A or B ('a-acme', 'b-acme') asks pebble for a certificate for
# $name by 'http' (HTTP-01, the token in the cluster's shared webroot) or 'tls' (TLS-ALPN-01
# on :5001, where the cluster's ingress sends ALPN acme-tls/1), and installs it where the
# cluster's nodes read it. Returns (exit status, lego's output).
sub issue {
    my ($acme, $name, $challenge) = @_;
    my @how = $challenge eq 'http' ? ('--http', '--http.webroot', '/srv/acme') : ('--tls', '--tls.port', ':5001');
    my $out = in_container(container($acme), 'env', 'LEGO_CA_CERTIFICATES=/lab-state/ca.pem', 'lego',
        '--server', 'https://' . addr('pebble') . ':14000/dir', '--accept-tos', '--email', 'ops@lab.test',
        '--domains', $name, '--path', '/root/lego', @how, 'run');
    my $rc = $?;
    return ($rc, $out) if $rc;
    $out .= in_container(container($acme), 'sh', '-c',
        "install -m 0644 /root/lego/certificates/$name.crt /root/lego/certificates/$name.key /srv/certs/");
    return ($?, $out);
}

# HTTPS from the client container to the edge's address, verified against pebble's root:
# (exit status, body).
sub client_https {
    my ($name) = @_;
    my $out = in_container(container('client'), 'curl', '-sS', '--max-time', '10', '--cacert', '/lab-state/root.pem',
        '--resolve', "$name:443:" . vip(), "https://$name/");
    return ($?, $out);
}

sub client_http {
    my ($name) = @_;
    my $out = in_container(container('client'), 'curl', '-sS', '--max-time', '10', '-H', "Host: $name",
        'http://' . vip() . '/');
    return ($?, $out);
}

# The certificate the client container is shown for $name through the edge: "serial issuer".
sub certificate_of {
    my ($name) = @_;
    my $out = in_container(container('client'), 'sh', '-c',
        "openssl s_client -connect ${\vip()}:443 -servername $name </dev/null 2>/dev/null"
        . " | openssl x509 -noout -serial -issuer");
    my ($serial) = $out =~ /serial=(\w+)/;
    my ($issuer) = $out =~ /issuer=.*?CN\s*=\s*([^\n,]+)/;
    return ($serial // '', $issuer // '');
}

# Cluster A's API server (the kube-a container), to change its objects from here; its
# kubeconfig for kubectl is written into the lab's folder, and KUBECONFIG points at it (HOME
# stays: docker reads its own configuration under it; kubectl is given --cache-dir).
sub kube {
    require Edge::FakeKube;
    my $kube = Edge::FakeKube->attach(lab_dir() . '/shared/kube-a', host => addr('kube-a'), port => 6443);
    local $ENV{HOME};
    $kube->kubeconfig(lab_dir());
    return $kube;
}

# Writes cluster $cluster's route file for @names into routes.d, renamed into place.
sub write_routes {
    my ($file, $cluster, @names) = @_;
    my $dir = lab_dir() . '/routes.d';
    my $top = $INC{'Edge/Lab.pm'} =~ s{nginx-test/lib/Edge/Lab\.pm$}{}r;
    system("$top/docker/lab/routes $cluster @names > $dir/$file.tmp") == 0 or die "routes failed";
    chmod 0644, "$dir/$file.tmp";
    rename "$dir/$file.tmp", "$dir/$file" or die "rename: $!";
}

# Starts the client container's steady load (lab-probe) as $tag; probe_stop returns its
# records: [start, end, 'ok'|'fail', node or why].
sub probe_start {
    my ($tag, @args) = @_;
    unlink map { lab_dir() . "/shared/$tag$_" } ('.log', '.stop', '.log.done');
    docker_ok('exec', '-d', container('client'), 'lab-probe', '--addr', vip(), @args,
        '--out', "/lab-state/$tag.log", '--until', "/lab-state/$tag.stop");
}

sub probe_records {
    my ($tag) = @_;
    open(my $fh, '<', lab_dir() . "/shared/$tag.log") or return [];
    return [map { chomp; [split / /, $_, 4] } <$fh>];
}

sub probe_stop {
    my ($tag) = @_;
    open(my $fh, '>', lab_dir() . "/shared/$tag.stop") or die "$tag.stop: $!";
    close $fh;
    wait_for(sub { -e lab_dir() . "/shared/$tag.log.done" }, "$tag probe stopped", 60);
    return probe_records($tag);
}

sub probe_wait {
    my ($tag, $cond, $what) = @_;
    wait_for(sub { $cond->(probe_records($tag)) }, $what, 120);
}

1;
